//! The key, secret and migrate commands: arguments, and what each does through the
//! [`KeyManager`].

use clap::{ArgAction, Args, Subcommand};
use keywarden::{
    manage::parse_grace, manage::Actor, manage::GraceParseError, manage::ManageErrorKind,
    manage::RevealOptions, manage::DEFAULT_GRACE, ratelimit::RateLimitPolicy, redis::RedisBackend,
    secret::SecretId, secret::PREVIOUS_SECRETS_ENV, secret::SECRET_ENV, store::KeyPatch,
    store::KeyQuery, store::KeyState, store::UnmigratedKeys, ExpiresIn, KeyManager, NewKey,
    OwnerKind, Secret,
};
use serde_json::{json, Value};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::output::{
    id_list, print_created, print_page, print_record, print_retirement, print_usage, Output,
};
use crate::{
    is_postgres, load_reveal_keys, load_secrets, open_store, redact_url, Context, Failure,
};
use keywarden::manage::{Granularity, UsageQuery};
use keywarden::net::IpNetwork;
use keywarden::store::{Refill, MAX_CREDITS};

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key and print it, once.
    Create(CreateArgs),
    /// List keys (never their plaintext or digest).
    List(ListArgs),
    /// Show one key.
    Show {
        /// Key id.
        #[arg(value_parser = parse_id)]
        id: Uuid,
    },
    /// Change a key's attributes.
    Update(UpdateArgs),
    /// Revoke a key, permanently.
    Revoke {
        /// Key id.
        #[arg(value_parser = parse_id)]
        id: Uuid,
    },
    /// Replace a key with a new one; the old one keeps working for a grace period.
    Rotate {
        /// Key id.
        #[arg(value_parser = parse_id)]
        id: Uuid,
        /// How long the old key keeps working (`0` ends it now) [default: 24h].
        #[arg(long, value_name = "DURATION", value_parser = parse_grace_arg)]
        grace: Option<Duration>,
    },
    /// Delete a key and its record.
    Delete {
        /// Key id.
        #[arg(value_parser = parse_id)]
        id: Uuid,
    },
    /// A key's requests per hour or day by outcome (accepted, rate limited, expired, ...).
    Usage {
        /// Key id.
        #[arg(value_parser = parse_id)]
        id: Uuid,
        /// From this long ago (7d, 24h) or this RFC 3339 instant [default: 7d before --until
        /// by hour, 30d by day].
        #[arg(long, value_name = "WHEN", value_parser = crate::audit::parse_when)]
        since: Option<crate::audit::When>,
        /// Up to this long ago or this RFC 3339 instant [default: now].
        #[arg(long, value_name = "WHEN", value_parser = crate::audit::parse_when)]
        until: Option<crate::audit::When>,
        /// Bucket size.
        #[arg(long, value_enum, default_value = "hour")]
        granularity: GranularityArg,
    },
    /// Print a viewable key's plaintext again (keys created with KEYWARDEN_REVEAL_KEY set).
    Reveal {
        /// Key id.
        #[arg(value_parser = parse_id)]
        id: Uuid,
        /// Also reveal a revoked, disabled or expired key.
        #[arg(long)]
        include_inactive: bool,
    },
}

/// `hour` or `day`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum GranularityArg {
    /// One row per hour.
    Hour,
    /// One row per day.
    Day,
}

#[derive(Subcommand)]
pub(crate) enum SecretCommand {
    /// Print a new random secret for KEYWARDEN_SECRET.
    Generate,
    /// Drop every key digest made under a previous secret, once no instance uses it any more.
    ///
    /// Run it after every instance runs the new ring (KEYWARDEN_SECRET set to the new secret):
    /// instances still holding only the retired secret stop verifying keys. Keys never used
    /// through an instance with the new secret since the rotation have no other digest: the
    /// command refuses and lists them, unless --force, which revokes them.
    Retire {
        /// The secret's id: 16 hex digits, as `keywarden serve` prints them at startup.
        #[arg(value_name = "SECRET_ID", value_parser = parse_secret_id)]
        id: SecretId,
        /// Retire even if some keys have no other digest; those keys are revoked.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
pub(crate) struct CreateArgs {
    /// Human-readable name.
    #[arg(long)]
    name: String,
    /// Collection: the slug clients send in `Authorization: <slug> API-Key <key>` [default:
    /// users].
    #[arg(long)]
    collection: Option<String>,
    /// Owner id [default: the key's name].
    #[arg(long)]
    subject: Option<String>,
    /// Owner kind.
    #[arg(long, default_value = "user", value_name = "user|team|service")]
    owner_kind: OwnerKind,
    /// A granted scope; repeat for more (`*` grants every scope but the `keys:` management
    /// scopes, which only their exact name grants).
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// Allow only safe methods (GET, HEAD, OPTIONS, TRACE).
    #[arg(long)]
    read_only: bool,
    /// Lifetime: 7d, 30d, 90d, any N{s,m,h,d,w}, or unlimited.
    #[arg(long, default_value = "unlimited", value_name = "DURATION")]
    expires_in: ExpiresIn,
    /// Per-key rate limit, e.g. 100/min or 10/s,burst=20.
    #[arg(long, value_name = "N/PERIOD")]
    rate_limit: Option<RateLimitPolicy>,
    /// Only accept the key from this network (CIDR, e.g. 10.0.0.0/8 or 2001:db8::/32, or one
    /// address); repeat or separate with commas for more. Default: from anywhere.
    #[arg(long = "allow-ip", value_name = "CIDR", value_delimiter = ',')]
    allowed_ips: Vec<IpNetwork>,
    /// Credits: how many requests the key may make in total (each costs 1, or its route's
    /// cost); at 0 it gets 429 usage_exceeded. Default: unlimited.
    #[arg(long, value_name = "N", value_parser = parse_credits, allow_hyphen_values = true)]
    credits: Option<u64>,
    /// Refill the credits, e.g. 1000/day or 50000/month (30 days): the balance is set to the
    /// amount at the start of each period. Without --credits the key starts with the amount.
    #[arg(long, value_name = "AMOUNT/PERIOD")]
    refill: Option<Refill>,
    /// Environment, which picks the key prefix (kw_live_, kw_test_).
    #[arg(long, default_value = "live", value_name = "live|test")]
    env: String,
    /// Description.
    #[arg(long)]
    description: Option<String>,
    /// Metadata: a JSON object.
    #[arg(long, value_name = "JSON", value_parser = parse_json)]
    metadata: Option<Value>,
}

#[derive(Args)]
pub(crate) struct ListArgs {
    /// Only keys of this collection.
    #[arg(long)]
    collection: Option<String>,
    /// Only keys of this subject.
    #[arg(long)]
    subject: Option<String>,
    /// Only keys of this environment (e.g. live, test).
    #[arg(long)]
    env: Option<String>,
    /// Only keys in this state.
    #[arg(long, value_name = "active|expired|revoked|disabled")]
    state: Option<KeyState>,
    /// Page size (1 to 500).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=500))]
    limit: u32,
    /// Start after this key id (the previous page's next cursor).
    #[arg(long, value_name = "ID", value_parser = parse_id)]
    after: Option<Uuid>,
}

#[derive(Args)]
pub(crate) struct UpdateArgs {
    /// Key id.
    #[arg(value_parser = parse_id)]
    id: Uuid,
    /// New name.
    #[arg(long)]
    name: Option<String>,
    /// New description.
    #[arg(long, conflicts_with = "no_description")]
    description: Option<String>,
    /// Remove the description.
    #[arg(long)]
    no_description: bool,
    /// Replace the scopes with these; repeat for more.
    #[arg(long = "scope", value_name = "SCOPE", conflicts_with = "no_scopes")]
    scopes: Vec<String>,
    /// Remove every scope.
    #[arg(long)]
    no_scopes: bool,
    /// Allow only safe methods.
    #[arg(long, value_name = "true|false", action = ArgAction::Set)]
    read_only: Option<bool>,
    /// New lifetime, counted from now: N{s,m,h,d,w} or unlimited.
    #[arg(long, value_name = "DURATION")]
    expires_in: Option<ExpiresIn>,
    /// New per-key rate limit.
    #[arg(long, value_name = "N/PERIOD", conflicts_with = "no_rate_limit")]
    rate_limit: Option<RateLimitPolicy>,
    /// Remove the per-key rate limit (the server default applies).
    #[arg(long)]
    no_rate_limit: bool,
    /// Replace the key's IP allowlist with these networks (CIDR or one address); repeat or
    /// separate with commas for more.
    #[arg(
        long = "allow-ip",
        value_name = "CIDR",
        value_delimiter = ',',
        conflicts_with = "allow_any_ip"
    )]
    allowed_ips: Vec<IpNetwork>,
    /// Remove the key's IP allowlist: accept it from any address.
    #[arg(long)]
    allow_any_ip: bool,
    /// Set the key's credit balance (voids what servers hold leased and restarts the refill
    /// schedule from now).
    #[arg(
        long,
        value_name = "N",
        value_parser = parse_credits,
        allow_hyphen_values = true,
        conflicts_with = "unlimited_credits"
    )]
    credits: Option<u64>,
    /// Remove the key's credits (and refill): unlimited use.
    #[arg(long, conflicts_with_all = ["refill", "no_refill"])]
    unlimited_credits: bool,
    /// Set the credits' refill, e.g. 1000/day (a key without credits starts with the amount).
    #[arg(long, value_name = "AMOUNT/PERIOD", conflicts_with = "no_refill")]
    refill: Option<Refill>,
    /// Remove the credits' refill.
    #[arg(long)]
    no_refill: bool,
    /// Disable the key (reversible with --enable).
    #[arg(long, conflicts_with = "enable")]
    disable: bool,
    /// Enable a disabled key.
    #[arg(long)]
    enable: bool,
    /// Replace the metadata with this JSON object.
    #[arg(long, value_name = "JSON", value_parser = parse_json)]
    metadata: Option<Value>,
}

/// The manager of the key and secret commands: the ring from the environment, the store, and
/// Redis (if configured) to tell running servers of changes.
pub(crate) async fn cli_manager(ctx: &Context) -> Result<KeyManager, Failure> {
    // The secret first: a missing secret should not leave a new database file behind.
    let secrets = load_secrets()?;
    let reveal_keys = load_reveal_keys()?;
    let (store, _) = open_store(&ctx.database_url).await?;
    let mut manager = KeyManager::new(store, secrets).with_actor(Actor::Cli);
    if let Some(format) = &ctx.key_format {
        manager = manager.with_key_format(format.clone());
    }
    if let Some(reveal_keys) = reveal_keys {
        manager = manager.with_reveal_keys(reveal_keys);
    }
    // Running servers without PostgreSQL learn of changes through Redis, if any.
    if let (Some(url), namespace) = ctx.redis() {
        match RedisBackend::connect(&url, &namespace).await {
            Ok(redis) => manager = manager.publishes_to(redis),
            Err(error) => eprintln!(
                "warning: Redis unreachable ({error}); running servers see this change within their cache TTL"
            ),
        }
    }
    Ok(manager)
}

async fn secret_retire(
    manager: &KeyManager,
    id: SecretId,
    force: bool,
    out: Output,
) -> Result<(), Failure> {
    let policy = if force {
        UnmigratedKeys::Revoke
    } else {
        UnmigratedKeys::Refuse
    };
    let outcome = match manager.retire_secret(id, policy).await {
        Ok(outcome) => outcome,
        Err(error) if error.kind() == ManageErrorKind::UnmigratedKeys => {
            let ids = error.unmigrated_keys();
            if out.json {
                out.print_json(&json!({
                    "secret_id": id.to_string(),
                    "retired": false,
                    "dropped_digests": 0,
                    "unmigrated_keys": ids,
                }));
            }
            return Err(Failure(format!(
                "secret {id} not retired: {} key(s) have no digest under any other secret and \
                 would never verify again: {}. Use each once through an instance running the \
                 new secret, or retire with --force to revoke them",
                ids.len(),
                id_list(ids)
            )));
        }
        Err(error) => return Err(error.into()),
    };
    print_retirement(id, &outcome, out);
    Ok(())
}

fn parse_json(text: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    if !value.is_object() {
        return Err("metadata must be a JSON object".into());
    }
    Ok(value)
}

fn parse_id(text: &str) -> Result<Uuid, String> {
    Uuid::parse_str(text.trim()).map_err(|e| format!("not a key id (a UUID): {e}"))
}

fn parse_secret_id(text: &str) -> Result<SecretId, String> {
    text.trim()
        .parse()
        .map_err(|_| "not a secret id (16 hex digits)".to_owned())
}

/// The library's grace rule, as the HTTP API applies it; no option is [`DEFAULT_GRACE`].
fn parse_grace_arg(text: &str) -> Result<Duration, GraceParseError> {
    parse_grace(Some(text))
}

fn secret_generate(out: Output) {
    let secret = Secret::generate();
    // Generated secrets are base62 text.
    let text = String::from_utf8_lossy(secret.expose());
    if out.json {
        out.print_json(&json!({ "secret": text }));
    } else {
        println!("{text}");
        eprintln!(
            "Set this as {SECRET_ENV} and keep it secret. To replace it later without \
             invalidating keys, move the old value to {PREVIOUS_SECRETS_ENV}."
        );
    }
}

pub(crate) async fn migrate(url: &str, out: Output) -> Result<(), Failure> {
    // Opening a store applies the migrations the database lacks.
    open_store(url).await?;
    let backend = if is_postgres(url) {
        "postgres"
    } else {
        "sqlite"
    };
    if out.json {
        out.print_json(&json!({ "migrated": true, "backend": backend }));
    } else {
        println!("database is up to date: {}", redact_url(url));
    }
    Ok(())
}

/// Runs a `secret` command.
pub(crate) async fn secret(
    ctx: &Context,
    command: SecretCommand,
    out: Output,
) -> Result<(), Failure> {
    match command {
        SecretCommand::Generate => {
            secret_generate(out);
            Ok(())
        }
        SecretCommand::Retire { id, force } => {
            let manager = cli_manager(ctx).await?;
            secret_retire(&manager, id, force, out).await
        }
    }
}

/// Runs a `keys` command.
pub(crate) async fn keys(ctx: &Context, command: KeysCommand, out: Output) -> Result<(), Failure> {
    let manager = &cli_manager(ctx).await?;
    match command {
        KeysCommand::Create(args) => {
            let subject = args.subject.unwrap_or_else(|| args.name.clone());
            let mut new = NewKey::new(args.name, subject)
                .owner_kind(args.owner_kind)
                .read_only(args.read_only)
                .environment(args.env)
                .expires_in(args.expires_in);
            new.collection = args.collection;
            new.scopes = args.scopes;
            new.description = args.description;
            new.rate_limit = args.rate_limit;
            new.allowed_ips = args.allowed_ips;
            if let Some(refill) = args.refill {
                new = new.refill(refill);
            }
            if let Some(credits) = args.credits {
                new = new.credits(credits);
            }
            if let Some(metadata) = args.metadata {
                new.metadata = metadata;
            }
            let created = manager.create(new).await?;
            print_created(&created, None, out);
        }
        KeysCommand::List(args) => {
            let query = KeyQuery {
                collection: args.collection,
                subject: args.subject,
                environment: args.env,
                state: args.state,
                after: args.after,
                limit: args.limit,
                ..KeyQuery::new()
            };
            let page = manager.list(&query).await?;
            print_page(&page, query.now, out);
        }
        KeysCommand::Show { id } => {
            let record = manager.get(id).await?;
            print_record(&record, out);
        }
        KeysCommand::Update(args) => {
            let id = args.id;
            let patch = patch_from(args)?;
            let record = manager.update(id, patch).await?;
            if !out.json {
                println!("updated key {id}");
            }
            print_record(&record, out);
        }
        KeysCommand::Revoke { id } => {
            let record = manager.revoke(id).await?;
            if out.json {
                print_record(&record, out);
            } else {
                println!("revoked key {id} ({})", record.name);
            }
        }
        KeysCommand::Rotate { id, grace } => {
            let created = manager.rotate(id, grace.unwrap_or(DEFAULT_GRACE)).await?;
            let old = manager.get(id).await?;
            print_created(&created, Some(&old), out);
        }
        KeysCommand::Usage {
            id,
            since,
            until,
            granularity,
        } => {
            let granularity = match granularity {
                GranularityArg::Hour => Granularity::Hour,
                GranularityArg::Day => Granularity::Day,
            };
            let now = OffsetDateTime::now_utc();
            let until = until.map_or(now, |w| w.at(now));
            let default_span = match granularity {
                Granularity::Hour => Duration::days(7),
                Granularity::Day => Duration::days(30),
            };
            let since = since.map_or_else(
                || until.checked_sub(default_span).unwrap_or(until),
                |w| w.at(now),
            );
            manager.get(id).await?;
            let query = UsageQuery {
                since,
                until,
                granularity,
            };
            let report = manager.usage(id, &query).await?;
            print_usage(&report, out);
        }
        KeysCommand::Reveal {
            id,
            include_inactive,
        } => {
            let options = RevealOptions::new().include_inactive(include_inactive);
            let key = manager
                .reveal_with(id, &Actor::Cli, options)
                .await
                .map_err(|error| match error.kind() {
                    ManageErrorKind::Inactive => {
                        Failure(format!("{error}; pass --include-inactive to reveal it"))
                    }
                    _ => error.into(),
                })?;
            if out.json {
                out.print_json(&json!({ "id": id, "key": key.expose() }));
            } else {
                println!("{}", key.expose());
            }
        }
        KeysCommand::Delete { id } => {
            let record = manager.delete(id).await?;
            if out.json {
                print_record(&record, out);
            } else {
                println!("deleted key {id} ({})", record.name);
            }
        }
    }
    Ok(())
}

/// A credit balance: a whole number from 0 to the most a key may hold.
pub(crate) fn parse_credits(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= MAX_CREDITS)
        .ok_or_else(|| format!("credits must be a whole number from 0 to {MAX_CREDITS}"))
}

fn patch_from(args: UpdateArgs) -> Result<KeyPatch, Failure> {
    let patch = KeyPatch {
        name: args.name,
        description: if args.no_description {
            Some(None)
        } else {
            args.description.map(Some)
        },
        scopes: if args.no_scopes {
            Some(Vec::new())
        } else if args.scopes.is_empty() {
            None
        } else {
            Some(args.scopes)
        },
        read_only: args.read_only,
        metadata: args.metadata,
        rate_limit: if args.no_rate_limit {
            Some(None)
        } else {
            args.rate_limit.map(Some)
        },
        expires_at: args
            .expires_in
            .map(|e| e.expires_at(OffsetDateTime::now_utc())),
        revoked_at: None,
        expected_updated_at: None,
        allowed_ips: if args.allow_any_ip {
            Some(Vec::new())
        } else if args.allowed_ips.is_empty() {
            None
        } else {
            Some(args.allowed_ips)
        },
        disabled: if args.disable {
            Some(true)
        } else if args.enable {
            Some(false)
        } else {
            None
        },
        credits: if args.unlimited_credits {
            Some(None)
        } else {
            args.credits.map(Some)
        },
        credit_refill: if args.no_refill {
            Some(None)
        } else {
            args.refill.map(Some)
        },
    };
    if patch == KeyPatch::default() {
        return Err(
            "nothing to update: give at least one option (see `keywarden keys update --help`)"
                .into(),
        );
    }
    Ok(patch)
}
