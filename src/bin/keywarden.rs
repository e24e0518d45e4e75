//! `keywarden`: manage API keys and run the demo server.
//!
//! ```text
//! keywarden [--database-url URL] [--json] <command>
//!   keys create --name N [--collection C] [--subject S] [--owner-kind user|team|service]
//!               [--scope X]... [--read-only] [--expires-in 30d|unlimited]
//!               [--rate-limit 100/min] [--env live|test] [--description D] [--metadata JSON]
//!   keys list [--collection C] [--subject S] [--state STATE] [--limit N] [--after ID]
//!   keys show ID
//!   keys update ID [--name N] [--description D|--no-description] [--scope X...|--no-scopes]
//!               [--read-only true|false] [--expires-in D] [--rate-limit R|--no-rate-limit]
//!               [--disable|--enable] [--metadata JSON]
//!   keys revoke ID | keys rotate ID [--grace 24h] | keys delete ID
//!   keys reveal ID [--include-inactive]
//!   migrate
//!   secret generate
//!   secret retire SECRET_ID [--force]
//!   serve [--addr 127.0.0.1:3000] [--redis-url URL]
//! ```
//!
//! The database comes from `--database-url` or `KEYWARDEN_DATABASE_URL` (default
//! `sqlite://keywarden.db`; `postgres://` and `postgresql://` select PostgreSQL). Key commands
//! and `serve` read the secret ring from `KEYWARDEN_SECRET` (or the file named by
//! `KEYWARDEN_SECRET_FILE`) and `KEYWARDEN_PREVIOUS_SECRETS` (or the file named by
//! `KEYWARDEN_PREVIOUS_SECRETS_FILE`, one per line), by the rules of `SecretRing::load`; its
//! warnings (a weak secret, say) go to stderr. Viewable keys' reveal keys come from
//! `KEYWARDEN_REVEAL_KEY` and `KEYWARDEN_PREVIOUS_REVEAL_KEYS` (or their `_FILE` variants).
//! Errors are one `error: ...` line on stderr and a non-zero exit status.

use std::error::Error as StdError;
use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use clap::error::ErrorKind;
use clap::{ArgAction, Args, Parser, Subcommand};
use keywarden::{
    demo_layer_builder, demo_router, parse_grace, Actor, CreatedKey, CreatedKeyView, ExpiresIn,
    GraceParseError, InvalidationListener, KeyManager, KeyPage, KeyPageView, KeyPatch, KeyQuery,
    KeyRecord, KeyState, KeyStore, KeyView, ManageError, ManageErrorKind, NewKey, OwnerKind,
    PostgresStore, RateLimitPolicy, RateLimiter, RedisBackend, RevealKeyError, RevealKeyRing,
    RevealOptions, Secret, SecretError, SecretId, SecretRetirement, SecretRing, SqliteStore,
    StoreError, UnmigratedKeys, DEFAULT_GRACE, PREVIOUS_SECRETS_ENV, SECRET_ENV,
};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::Connection;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

/// How long opening the database may take before the command gives up.
const CONNECT_TIMEOUT: StdDuration = StdDuration::from_secs(15);
/// How long `serve` waits for open connections to finish after a shutdown signal.
const SHUTDOWN_GRACE: StdDuration = StdDuration::from_secs(10);
const ONCE_WARNING: &str = "Store this key now: it will not be shown again.";

#[derive(Parser)]
#[command(
    name = "keywarden",
    version,
    about = "Manage keywarden API keys and run the demo server",
    after_help = "Key commands and `serve` read the secret from KEYWARDEN_SECRET or the file \
                  named by KEYWARDEN_SECRET_FILE (and old ones from KEYWARDEN_PREVIOUS_SECRETS, \
                  comma-separated, or KEYWARDEN_PREVIOUS_SECRETS_FILE, one per line); create \
                  one with `keywarden secret generate`."
)]
struct Cli {
    /// Database URL: sqlite://PATH or postgres://USER@HOST/DB.
    #[arg(
        long,
        global = true,
        env = "KEYWARDEN_DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://keywarden.db",
        value_name = "URL"
    )]
    database_url: String,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, list, show, update, revoke, rotate and delete keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Create or upgrade the database schema.
    Migrate,
    /// Application secrets.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Run the demo server: /healthz (open), /whoami and /admin/keys behind the layer.
    Serve(ServeArgs),
}

#[derive(Subcommand)]
enum KeysCommand {
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

#[derive(Subcommand)]
enum SecretCommand {
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
struct CreateArgs {
    /// Human-readable name.
    #[arg(long)]
    name: String,
    /// Collection: the slug clients send in `Authorization: <slug> API-Key <key>`.
    #[arg(long, default_value = "users")]
    collection: String,
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
struct ListArgs {
    /// Only keys of this collection.
    #[arg(long)]
    collection: Option<String>,
    /// Only keys of this subject.
    #[arg(long)]
    subject: Option<String>,
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
struct UpdateArgs {
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

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "KEYWARDEN_ADDR", default_value = "127.0.0.1:3000")]
    addr: String,
    /// Redis URL: rate limits shared by every instance, and pub/sub cache invalidation.
    #[arg(
        long,
        env = "KEYWARDEN_REDIS_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    redis_url: Option<String>,
    /// Prefix of every Redis key and channel; instances of one deployment share it.
    #[arg(long, env = "KEYWARDEN_REDIS_NAMESPACE", default_value = "keywarden")]
    redis_namespace: String,
}

/// A command failure: one line for stderr. Never holds key or secret material.
struct Failure(String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line, whatever the underlying errors contained.
        let mut first = true;
        for line in self.0.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if !first {
                f.write_str(" ")?;
            }
            f.write_str(line)?;
            first = false;
        }
        Ok(())
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Self(message.to_owned())
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Self(with_sources(&error))
    }
}

impl From<ManageError> for Failure {
    fn from(error: ManageError) -> Self {
        match error.store_error() {
            Some(store) => Self(with_sources(store)),
            None => Self(error.to_string()),
        }
    }
}

impl From<RevealKeyError> for Failure {
    fn from(error: RevealKeyError) -> Self {
        Self(error.to_string())
    }
}

impl From<SecretError> for Failure {
    fn from(error: SecretError) -> Self {
        let hint = "generate one with `keywarden secret generate`";
        Self(match error {
            SecretError::TooShort { .. } => {
                format!("{SECRET_ENV} or a previous secret is too short: {error}; {hint}")
            }
            SecretError::At { .. } => format!("{error}; {hint}"),
            SecretError::Missing(_) | SecretError::Conflict(..) | SecretError::File { .. } => {
                format!("{error}")
            }
            other => format!("{other}; {hint}"),
        })
    }
}

/// The secret ring from the environment (variables or `_FILE`s), its warnings on stderr.
fn load_secrets() -> Result<SecretRing, SecretError> {
    let (ring, warnings) = SecretRing::load(std::env::var_os)?;
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    Ok(ring)
}

/// The reveal key ring from the environment (read by the secrets' rules), if one is
/// configured; its warnings on stderr.
fn load_reveal_keys() -> Result<Option<RevealKeyRing>, RevealKeyError> {
    let Some((ring, warnings)) = RevealKeyRing::load(std::env::var_os)? else {
        return Ok(None);
    };
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    Ok(Some(ring))
}

/// The error's message followed by its sources' messages, skipping repeats.
fn with_sources(error: &dyn StdError) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = inner.source();
    }
    message
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(error),
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::FAILURE
        }
    }
}

/// Bad option values get clap's first line only (`error: invalid value ...`); help, version and
/// other usage errors keep clap's own output and exit codes.
fn usage_error(error: clap::Error) -> ExitCode {
    match error.kind() {
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            let text = error.to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: invalid value"));
            ExitCode::from(2)
        }
        _ => error.exit(),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let out = Output { json: cli.json };
    match cli.command {
        Command::Secret(SecretCommand::Generate) => {
            secret_generate(out);
            Ok(())
        }
        Command::Secret(SecretCommand::Retire { id, force }) => {
            let manager = cli_manager(&cli.database_url).await?;
            secret_retire(&manager, id, force, out).await
        }
        Command::Migrate => migrate(&cli.database_url, out).await,
        Command::Serve(args) => serve(&cli.database_url, args, out).await,
        Command::Keys(command) => {
            let manager = cli_manager(&cli.database_url).await?;
            keys(&manager, command, out).await
        }
    }
}

/// The manager of the key and secret commands: the ring from the environment, the store, and
/// Redis (if configured) to tell running servers of changes.
async fn cli_manager(database_url: &str) -> Result<KeyManager, Failure> {
    // The secret first: a missing secret should not leave a new database file behind.
    let secrets = load_secrets()?;
    let reveal_keys = load_reveal_keys()?;
    let (store, _) = open_store(database_url).await?;
    let mut manager = KeyManager::new(store, secrets);
    if let Some(reveal_keys) = reveal_keys {
        manager = manager.with_reveal_keys(reveal_keys);
    }
    // Running servers without PostgreSQL learn of changes through Redis, if any.
    if let Ok(url) = std::env::var("KEYWARDEN_REDIS_URL") {
        let namespace =
            std::env::var("KEYWARDEN_REDIS_NAMESPACE").unwrap_or_else(|_| "keywarden".to_owned());
        match RedisBackend::connect(&url, &namespace).await {
            Ok(redis) => manager = manager.publishes_to(redis),
            Err(error) => eprintln!(
                "warning: Redis unreachable ({error}); running servers see this change within their cache TTL"
            ),
        }
    }
    Ok(manager)
}

/// The ring's secret ids (never the secrets), for `secret retire`.
fn ring_ids(ring: &SecretRing) -> String {
    let previous: Vec<String> = ring.previous_ids().map(|id| id.to_string()).collect();
    format!(
        "secret ids: current {}, previous {}",
        ring.current_id(),
        if previous.is_empty() {
            "none".to_owned()
        } else {
            previous.join(", ")
        }
    )
}

/// How many key ids a text message lists before "and N more".
const LISTED_IDS: usize = 10;

fn id_list(ids: &[Uuid]) -> String {
    let mut text = ids
        .iter()
        .take(LISTED_IDS)
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > LISTED_IDS {
        text.push_str(&format!(" and {} more", ids.len() - LISTED_IDS));
    }
    text
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

fn print_retirement(id: SecretId, outcome: &SecretRetirement, out: Output) {
    if out.json {
        out.print_json(&json!({
            "secret_id": id.to_string(),
            "retired": true,
            "dropped_digests": outcome.dropped,
            "affected_keys": outcome.affected.len(),
            "revoked_keys": outcome.unmigrated,
        }));
        return;
    }
    println!(
        "retired secret {id}: dropped {} digest(s) of {} key(s)",
        outcome.dropped,
        outcome.affected.len()
    );
    if !outcome.unmigrated.is_empty() {
        println!(
            "revoked {} key(s) that had no other digest: {}",
            outcome.unmigrated.len(),
            id_list(&outcome.unmigrated)
        );
    }
}

#[derive(Clone, Copy)]
struct Output {
    json: bool,
}

impl Output {
    fn print_json(self, value: &Value) {
        self.print(value);
    }

    /// Pretty JSON on stdout.
    fn print(self, value: &impl Serialize) {
        match serde_json::to_string_pretty(value) {
            Ok(text) => println!("{text}"),
            Err(error) => eprintln!("error: cannot print JSON: {error}"),
        }
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Opens (and migrates) the store named by `url`; the PostgreSQL store also as itself, for
/// LISTEN/NOTIFY.
async fn open_store(url: &str) -> Result<(Arc<dyn KeyStore>, Option<PostgresStore>), Failure> {
    let postgres = is_postgres(url);
    if !postgres && !url.starts_with("sqlite:") {
        let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
        return Err(Failure(format!(
            "unsupported database URL (scheme `{}`): expected sqlite://PATH or postgres://USER@HOST/DB",
            scheme.chars().take(20).collect::<String>()
        )));
    }
    let open = async {
        if postgres {
            // The pool retries refused connections until its acquire timeout; one plain
            // connection first reports an unreachable server at once, with the reason.
            let probe = sqlx::PgConnection::connect(url).await.map_err(|e| {
                Failure(format!(
                    "cannot connect to PostgreSQL at {}: {}",
                    redact_url(url),
                    with_sources(&e)
                ))
            })?;
            let _ = probe.close().await;
            let store = PostgresStore::connect(url).await?;
            Ok::<_, Failure>((Arc::new(store.clone()) as Arc<dyn KeyStore>, Some(store)))
        } else {
            let store = SqliteStore::connect(url).await?;
            Ok((Arc::new(store) as Arc<dyn KeyStore>, None))
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, open).await {
        Ok(result) => result,
        Err(_) => Err(Failure(format!(
            "cannot reach the database at {} within {} s",
            redact_url(url),
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// The URL without password or query string, for messages.
fn redact_url(url: &str) -> String {
    let url = url.split('?').next().unwrap_or(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}{path}")
        }
        None => url.to_owned(),
    }
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

async fn migrate(url: &str, out: Output) -> Result<(), Failure> {
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

async fn serve(url: &str, args: ServeArgs, out: Output) -> Result<(), Failure> {
    let secrets = load_secrets()?;
    let reveal_keys = load_reveal_keys()?;
    let ring_ids = ring_ids(&secrets);
    let (store, postgres) = open_store(url).await?;
    let redis = match &args.redis_url {
        Some(redis_url) => Some(
            RedisBackend::connect(redis_url, &args.redis_namespace)
                .await
                .map_err(|e| Failure(format!("cannot use Redis: {e}")))?,
        ),
        None => None,
    };
    let mut builder = demo_layer_builder().store(store).secrets(secrets);
    if let Some(redis) = &redis {
        builder = builder.rate_limiter(RateLimiter::redis(redis));
    }
    let layer = builder.build().map_err(|e| Failure(e.to_string()))?;
    let mut manager = KeyManager::for_layer(&layer);
    if let Some(reveal_keys) = reveal_keys {
        manager = manager.with_reveal_keys(reveal_keys);
    }
    // Other instances hear of changes through NOTIFY (PostgreSQL) and/or Redis.
    let mut listeners = Vec::new();
    if let Some(postgres) = &postgres {
        listeners.push(
            InvalidationListener::postgres(&layer, postgres)
                .await
                .map_err(|e| Failure(format!("cannot LISTEN for invalidations: {e}")))?,
        );
    }
    if let Some(redis) = &redis {
        manager = manager.publishes_to(redis.clone());
        listeners.push(
            InvalidationListener::redis(&layer, redis)
                .await
                .map_err(|e| Failure(format!("cannot subscribe to Redis: {e}")))?,
        );
    }
    let app = demo_router(layer.clone(), Arc::new(manager));
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .map_err(|e| Failure(format!("cannot listen on {}: {e}", args.addr)))?;
    let local = listener
        .local_addr()
        .map_err(|e| Failure(format!("cannot read the listening address: {e}")))?;
    if out.json {
        println!("{}", json!({ "listening": format!("http://{local}") }));
    } else {
        println!("listening on http://{local}");
        println!("{ring_ids}");
        println!(
            "routes: GET /healthz (open), GET /whoami, /admin/keys (API key required; \
             collections users, teams, services)"
        );
        let propagation = match (listeners.is_empty(), redis.is_some()) {
            (true, _) => {
                "within the cache TTL (60 s); use PostgreSQL or --redis-url for instant propagation"
            }
            (false, true) => {
                "at once (PostgreSQL NOTIFY / Redis pub/sub; set KEYWARDEN_REDIS_URL for the CLI)"
            }
            (false, false) => "at once (PostgreSQL NOTIFY)",
        };
        println!(
            "changes made through /admin apply at once; changes made by other processes \
             (e.g. `keywarden keys revoke`) {propagation}"
        );
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(());
    });
    let server = tokio::spawn(async move { server.await });
    // Stop waiting for slow clients a while after the signal rather than hanging forever.
    let result = match tokio::select! {
        result = server => Some(result),
        _ = async {
            let _ = stop_rx.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => None,
    } {
        Some(Ok(Ok(()))) => Ok(()),
        Some(Ok(Err(e))) => Err(Failure(format!("server error: {e}"))),
        Some(Err(e)) => Err(Failure(format!("server task failed: {e}"))),
        None => Ok(()),
    };
    // Uses are written behind in batches: write the last ones before exiting.
    if let Err(error) = layer.flush_usage().await {
        eprintln!("warning: could not record the last key uses: {error}");
    }
    drop(listeners);
    if !out.json {
        println!("shut down");
    }
    result
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM. If a signal cannot be watched it never fires.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

async fn keys(manager: &KeyManager, command: KeysCommand, out: Output) -> Result<(), Failure> {
    match command {
        KeysCommand::Create(args) => {
            let subject = args.subject.unwrap_or_else(|| args.name.clone());
            let mut new = NewKey::new(args.name, subject)
                .collection(args.collection)
                .owner_kind(args.owner_kind)
                .read_only(args.read_only)
                .environment(args.env)
                .expires_in(args.expires_in);
            new.scopes = args.scopes;
            new.description = args.description;
            new.rate_limit = args.rate_limit;
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
        disabled: if args.disable {
            Some(true)
        } else if args.enable {
            Some(false)
        } else {
            None
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

fn short_time(at: Option<OffsetDateTime>, none: &str) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]Z");
    match at {
        Some(at) => at
            .to_offset(time::UtcOffset::UTC)
            .format(&format)
            .unwrap_or_else(|_| at.to_string()),
        None => none.to_owned(),
    }
}

fn print_created(created: &CreatedKey, rotated: Option<&KeyRecord>, out: Output) {
    let record = &created.record;
    if out.json {
        /// The old key of a rotation: the one it replaced, and when that one stops working.
        #[derive(Serialize)]
        struct Rotated {
            old_key_id: Uuid,
            #[serde(with = "time::serde::rfc3339::option")]
            old_key_expires_at: Option<OffsetDateTime>,
        }
        #[derive(Serialize)]
        struct Shown<'a> {
            #[serde(flatten)]
            created: CreatedKeyView<'a>,
            #[serde(flatten)]
            rotated: Option<Rotated>,
        }
        out.print(&Shown {
            created: CreatedKeyView::new(created, OffsetDateTime::now_utc()),
            rotated: rotated.map(|old| Rotated {
                old_key_id: old.id,
                old_key_expires_at: old.expires_at,
            }),
        });
        eprintln!("warning: {ONCE_WARNING}");
        return;
    }
    match rotated {
        Some(old) => {
            println!(
                "Rotated key {} into {} ({:?}).",
                old.id, record.id, record.name
            );
            println!(
                "The old key keeps working until {}.",
                short_time(old.expires_at, "it expires")
            );
        }
        None => println!(
            "Created key {} ({:?}) for {} {:?} in collection {:?}, expires {}.",
            record.id,
            record.name,
            record.owner_kind,
            record.subject,
            record.collection,
            short_time(record.expires_at, "never")
        ),
    }
    println!();
    println!("    {}", created.key.expose());
    println!();
    println!("{ONCE_WARNING}");
}

fn print_record(record: &KeyRecord, out: Output) {
    let now = OffsetDateTime::now_utc();
    if out.json {
        out.print(&KeyView::new(record, now));
        return;
    }
    let dash = || "-".to_owned();
    let rows = [
        ("id", record.id.to_string()),
        ("name", record.name.clone()),
        (
            "description",
            record.description.clone().unwrap_or_else(dash),
        ),
        ("display start", format!("{}...", record.display_start)),
        ("collection", record.collection.clone()),
        ("subject", record.subject.clone()),
        ("owner kind", record.owner_kind.to_string()),
        (
            "scopes",
            if record.scopes.is_empty() {
                dash()
            } else {
                record.scopes.join(", ")
            },
        ),
        ("environment", record.environment.clone()),
        (
            "read only",
            if record.read_only { "yes" } else { "no" }.into(),
        ),
        ("state", record.state(now).as_str().into()),
        (
            "rate limit",
            record.rate_limit.map_or_else(dash, |p| p.to_string()),
        ),
        ("metadata", record.metadata.to_string()),
        ("created", short_time(Some(record.created_at), "")),
        ("updated", short_time(Some(record.updated_at), "")),
        ("expires", short_time(record.expires_at, "never")),
        ("last used", short_time(record.last_used_at, "never")),
        ("uses", record.use_count.to_string()),
        ("revoked", short_time(record.revoked_at, "-")),
        (
            "rotated from",
            record.rotated_from.map_or_else(dash, |id| id.to_string()),
        ),
    ];
    for (label, value) in rows {
        println!("{label:<14}{value}");
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut short: String = text.chars().take(max - 1).collect();
        short.push('…');
        short
    }
}

fn print_page(page: &KeyPage, now: OffsetDateTime, out: Output) {
    if out.json {
        out.print(&KeyPageView::new(page, now));
        return;
    }
    if page.items.is_empty() {
        println!("no keys");
        // A page of only unreadable rows (skipped by the store) may still have a next one.
        if let Some(cursor) = page.next_cursor {
            println!("more keys: --after {cursor}");
        }
        return;
    }
    let header = [
        "ID",
        "NAME",
        "DISPLAY",
        "COLLECTION",
        "SUBJECT",
        "STATE",
        "EXPIRES",
        "LAST USED",
    ];
    let rows: Vec<[String; 8]> = page
        .items
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                truncate(&r.name, 32),
                format!("{}...", r.display_start),
                truncate(&r.collection, 20),
                truncate(&r.subject, 24),
                r.state(now).as_str().to_owned(),
                short_time(r.expires_at, "never"),
                short_time(r.last_used_at, "never"),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 2));
            }
        }
        println!("{}", text.trim_end());
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    if let Some(cursor) = page.next_cursor {
        println!("more keys: --after {cursor}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_and_queries() {
        assert_eq!(
            redact_url("postgres://me:hunter2@db.example:5432/keys?password=x"),
            "postgres://me@db.example:5432/keys"
        );
        assert_eq!(redact_url("sqlite://keywarden.db"), "sqlite://keywarden.db");
    }

    #[test]
    fn failures_are_one_line() {
        let failure = Failure("a\nb\r\n\nc".into());
        assert_eq!(failure.to_string(), "a b c");
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
