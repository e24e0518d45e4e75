//! The `webhooks` commands: subscribe URLs to signed event deliveries.

use clap::{ArgAction, Subcommand};
use keywarden::manage::NewWebhook;
use keywarden::store::WebhookPatch;
use keywarden::webhooks::WebhookView;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::cli::cli_manager;
use crate::output::Output;
use crate::serve::webhook_targets;
use crate::{Context, Failure};

#[derive(Subcommand)]
pub(crate) enum WebhooksCommand {
    /// Subscribe a URL to events and print its signing secret, once.
    Create {
        /// Where events are POSTed (https; within server.webhook_hosts when configured).
        #[arg(long)]
        url: String,
        /// Event types, comma-separated (key.created, key.updated, key.revoked,
        /// key.disabled, key.enabled, key.rotated, key.deleted, key.revealed,
        /// secret.retired, webhook.created, webhook.updated, webhook.deleted,
        /// owner.updated, owner.deleted, key.expiring) or *.
        #[arg(long, value_delimiter = ',', required = true)]
        events: Vec<String>,
        /// A description.
        #[arg(long)]
        description: Option<String>,
    },
    /// List subscriptions and their delivery state.
    List,
    /// Show one subscription.
    Show {
        /// Webhook id.
        #[arg(value_parser = parse_id)]
        id: Uuid,
    },
    /// Change, pause or resume a subscription.
    Update {
        /// Webhook id.
        #[arg(value_parser = parse_id)]
        id: Uuid,
        /// A new URL.
        #[arg(long)]
        url: Option<String>,
        /// New event types, comma-separated.
        #[arg(long, value_delimiter = ',')]
        events: Option<Vec<String>>,
        /// A new description.
        #[arg(long)]
        description: Option<String>,
        /// Pause deliveries.
        #[arg(long, action = ArgAction::SetTrue, conflicts_with = "enable")]
        disable: bool,
        /// Resume deliveries (and retry at once).
        #[arg(long, action = ArgAction::SetTrue)]
        enable: bool,
    },
    /// Delete a subscription.
    Delete {
        /// Webhook id.
        #[arg(value_parser = parse_id)]
        id: Uuid,
    },
}

fn parse_id(text: &str) -> Result<Uuid, String> {
    Uuid::parse_str(text.trim()).map_err(|e| format!("not a webhook id (a UUID): {e}"))
}

fn at(time: Option<time::OffsetDateTime>) -> String {
    time.and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

/// One line: id, URL, events, where delivery stands, and its state.
fn print_webhook(view: &WebhookView) {
    let state = match (&view.last_error, view.attempts) {
        _ if view.disabled => "paused".to_owned(),
        (Some(error), attempts) if attempts > 0 => format!(
            "failing: {error}; {attempts} failed attempt{}, next at {}",
            if attempts == 1 { "" } else { "s" },
            at(view.next_attempt_at)
        ),
        _ => "ok".to_owned(),
    };
    println!(
        "{}  {}  events={}  next event after #{}  {state}",
        view.id,
        view.url,
        view.events.join(","),
        view.delivered_through
    );
}

/// Every field (`webhooks show`).
fn print_details(view: &WebhookView) {
    print_webhook(view);
    println!(
        "  description:     {}",
        view.description.as_deref().unwrap_or("-")
    );
    println!("  created:         {}", at(Some(view.created_at)));
    println!("  failing since:   {}", at(view.failing_since));
    println!(
        "  last error:      {}",
        view.last_error.as_deref().unwrap_or("-")
    );
}

/// The webhook targets of the CLI: the environment, else the config file (as `serve`).
fn targets(ctx: &Context) -> keywarden::webhooks::WebhookTargets {
    let flag = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
    };
    let hosts = std::env::var("KEYWARDEN_WEBHOOK_HOSTS")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.split(',').map(|h| h.trim().to_owned()).collect())
        .or_else(|| ctx.file.server.webhook_hosts.clone());
    webhook_targets(
        hosts,
        flag("KEYWARDEN_WEBHOOK_ALLOW_HTTP")
            .or(ctx.file.server.webhook_allow_http)
            .unwrap_or(false),
        flag("KEYWARDEN_WEBHOOK_ALLOW_PRIVATE")
            .or(ctx.file.server.webhook_allow_private)
            .unwrap_or(false),
    )
}

/// Runs a `webhooks` command.
pub(crate) async fn webhooks(
    ctx: &Context,
    command: WebhooksCommand,
    out: Output,
) -> Result<(), Failure> {
    let manager = cli_manager(ctx).await?.with_webhook_targets(targets(ctx));
    match command {
        WebhooksCommand::Create {
            url,
            events,
            description,
        } => {
            let created = manager
                .create_webhook(NewWebhook {
                    url,
                    events,
                    description,
                })
                .await?;
            if out.json {
                out.print_json(&json!(created));
            } else {
                print_webhook(&created.webhook);
                println!("signing secret: {}", created.secret);
                println!(
                    "Store this secret now: it will not be shown again. Verify each delivery's \
                     webhook-signature with it (Standard Webhooks)."
                );
            }
        }
        WebhooksCommand::List => {
            let all = manager.list_webhooks().await?;
            if out.json {
                out.print_json(&json!({ "items": all }));
            } else if all.is_empty() {
                println!("no webhooks");
            } else {
                all.iter().for_each(print_webhook);
            }
        }
        WebhooksCommand::Show { id } => {
            let view = manager.get_webhook(id).await?;
            if out.json {
                out.print_json(&json!(view));
            } else {
                print_details(&view);
            }
        }
        WebhooksCommand::Update {
            id,
            url,
            events,
            description,
            disable,
            enable,
        } => {
            let patch = WebhookPatch {
                url,
                events,
                description: description.map(Some),
                disabled: if disable {
                    Some(true)
                } else if enable {
                    Some(false)
                } else {
                    None
                },
            };
            let view = manager.update_webhook(id, patch).await?;
            if out.json {
                out.print_json(&json!(view));
            } else {
                print_webhook(&view);
            }
        }
        WebhooksCommand::Delete { id } => {
            manager.delete_webhook(id).await?;
            if out.json {
                out.print_json(&json!({ "deleted": id }));
            } else {
                println!("deleted webhook {id}");
            }
        }
    }
    Ok(())
}
