//! The `owners` commands: policies all of an owner's keys share (a rate limit and/or credits).

use clap::{Args, Subcommand};
use keywarden::manage::ManageErrorKind;
use keywarden::ratelimit::RateLimitPolicy;
use keywarden::store::{OwnerPolicy, OwnerPolicyUpdate, Refill};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;

use crate::cli::{cli_manager, parse_credits};
use crate::output::Output;
use crate::{Context, Failure};

#[derive(Subcommand)]
pub(crate) enum OwnersCommand {
    /// Create or change the limits all of an owner's keys share, on top of each key's own.
    Set(SetArgs),
    /// List owner policies.
    List {
        /// Only this collection's owners.
        #[arg(long)]
        collection: Option<String>,
    },
    /// Show an owner's policy.
    Show(OwnerArgs),
    /// Remove an owner's policy and its shared credits.
    Delete(OwnerArgs),
}

#[derive(Args)]
pub(crate) struct OwnerArgs {
    /// The owner: the subject of its keys.
    subject: String,
    /// The collection of the owner's keys.
    #[arg(long, default_value = "users")]
    collection: String,
}

#[derive(Args)]
pub(crate) struct SetArgs {
    #[command(flatten)]
    owner: OwnerArgs,
    /// A rate limit all the owner's keys share, e.g. 600/min or 600/min,burst=50.
    #[arg(long, value_name = "N/PERIOD", conflicts_with = "no_rate_limit")]
    rate_limit: Option<RateLimitPolicy>,
    /// Remove the owner's own rate limit (the collection's owner limit applies, if any).
    #[arg(long)]
    no_rate_limit: bool,
    /// Set the shared credit balance (voids what servers hold leased and restarts the refill
    /// schedule from now).
    #[arg(
        long,
        value_name = "N",
        value_parser = parse_credits,
        allow_hyphen_values = true,
        conflicts_with = "unlimited_credits"
    )]
    credits: Option<u64>,
    /// Remove the shared credits (and their refill).
    #[arg(long, conflicts_with_all = ["refill", "no_refill"])]
    unlimited_credits: bool,
    /// Refill the shared credits, e.g. 10000/month (30 days): the balance is set to the amount
    /// at the start of each period. An owner without credits starts with the amount.
    #[arg(long, value_name = "AMOUNT/PERIOD", conflicts_with = "no_refill")]
    refill: Option<Refill>,
    /// Remove the shared credits' refill.
    #[arg(long)]
    no_refill: bool,
}

fn no_policy(owner: &OwnerArgs) -> Failure {
    Failure::from(format!(
        "owner {}/{} has no policy",
        owner.collection, owner.subject
    ))
}

fn update_from(args: &SetArgs) -> Result<OwnerPolicyUpdate, Failure> {
    let mut update = OwnerPolicyUpdate::default();
    if args.no_rate_limit {
        update = update.rate_limit(None);
    } else if let Some(rate) = args.rate_limit {
        update = update.rate_limit(Some(rate));
    }
    if args.unlimited_credits {
        update = update.credits(None);
    } else if let Some(credits) = args.credits {
        update = update.credits(Some(credits));
    }
    if args.no_refill {
        update = update.refill(None);
    } else if let Some(refill) = args.refill {
        update = update.refill(Some(refill));
    }
    if update == OwnerPolicyUpdate::default() {
        return Err(Failure::from(
            "nothing to change: give --rate-limit, --credits or --refill (or --no-rate-limit, --unlimited-credits, --no-refill)",
        ));
    }
    Ok(update)
}

fn view(policy: &OwnerPolicy) -> Value {
    json!({
        "collection": policy.collection,
        "subject": policy.subject,
        "rate_limit": policy.rate_limit.map(|r| r.to_string()),
        "credits": policy.credits.map(|c| c.remaining),
        "refill": policy.credits.and_then(|c| c.refill).map(|r| r.to_string()),
        "updated_at": policy.updated_at.format(&Rfc3339).ok(),
    })
}

/// One line: who, the shared rate limit, the shared credits.
fn print_policy(policy: &OwnerPolicy) {
    let rate = policy
        .rate_limit
        .map_or_else(|| "-".to_owned(), |r| r.to_string());
    println!(
        "{}/{}  rate limit: {rate}  credits: {}",
        policy.collection,
        policy.subject,
        credits_text(policy)
    );
}

/// `owners list`: one aligned row per owner.
fn print_table(policies: &[OwnerPolicy]) {
    let rows: Vec<[String; 4]> = policies
        .iter()
        .map(|p| {
            [
                p.collection.clone(),
                p.subject.clone(),
                p.rate_limit
                    .map_or_else(|| "-".to_owned(), |r| r.to_string()),
                credits_text(p),
            ]
        })
        .collect();
    let header = ["COLLECTION", "SUBJECT", "RATE LIMIT", "CREDITS"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ");
        println!("{}", line.trim_end());
    }
}

fn credits_text(policy: &OwnerPolicy) -> String {
    policy
        .credits
        .map_or_else(|| "-".to_owned(), crate::output::credits_words)
}

/// Runs an `owners` command.
pub(crate) async fn owners(
    ctx: &Context,
    command: OwnersCommand,
    out: Output,
) -> Result<(), Failure> {
    let manager = cli_manager(ctx).await?;
    match command {
        OwnersCommand::Set(args) => {
            let update = update_from(&args)?;
            let policy = manager
                .set_owner_policy(&args.owner.collection, &args.owner.subject, update)
                .await?;
            if out.json {
                out.print_json(&view(&policy));
            } else {
                print_policy(&policy);
                println!(
                    "Every key of this owner now counts against these limits too (running servers re-read them within their change-feed poll)."
                );
            }
        }
        OwnersCommand::List { collection } => {
            let all = manager.owner_policies(collection.as_deref()).await?;
            if out.json {
                out.print_json(&json!({ "items": all.iter().map(view).collect::<Vec<_>>() }));
            } else if all.is_empty() {
                println!("no owner policies");
            } else {
                print_table(&all);
            }
        }
        OwnersCommand::Show(owner) => {
            match manager
                .owner_policy(&owner.collection, &owner.subject)
                .await?
            {
                Some(policy) if out.json => out.print_json(&view(&policy)),
                Some(policy) => print_policy(&policy),
                None => return Err(no_policy(&owner)),
            }
        }
        OwnersCommand::Delete(owner) => {
            match manager
                .delete_owner_policy(&owner.collection, &owner.subject)
                .await
            {
                Ok(_) => {}
                Err(error) if error.kind() == ManageErrorKind::NotFound => {
                    return Err(no_policy(&owner));
                }
                Err(error) => return Err(error.into()),
            }
            if out.json {
                out.print_json(&json!({ "deleted": { "collection": owner.collection, "subject": owner.subject } }));
            } else {
                println!(
                    "removed the policy of {}/{}",
                    owner.collection, owner.subject
                );
            }
        }
    }
    Ok(())
}
