//! `keywarden`: manage API keys and run the keywarden server.
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
//!   serve [--addr 127.0.0.1:3000] [--redis-url URL] [--metrics-addr 127.0.0.1:9464]
//!         [--collections A,B] [--client-address-header H [--trusted-proxies CIDR,...]]
//!         [--shutdown-delay D] [--shutdown-grace D] [--log-format text|json] [--log-requests]
//! ```
//!
//! Every command takes `--config keywarden.toml` (or `KEYWARDEN_CONFIG`); flags and
//! environment variables win over the file (docs/deploy.md lists its fields).
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
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use keywarden::{
    key::KeyFormat, manage::RevealKeyError, manage::RevealKeyRing, secret::SecretError,
    secret::SECRET_ENV, KeyStore, ManageError, PostgresStore, SecretRing, SqliteStore, StoreError,
};
use sqlx::Connection;

mod audit;
mod cli;
mod config;
mod demo;
mod health;
mod metrics;
mod output;
mod owners;
mod serve;
mod webhooks;

use cli::{KeysCommand, SecretCommand};
use config::FileConfig;
use output::Output;
use serve::ServeArgs;

/// How long opening the database may take before the command gives up.
const CONNECT_TIMEOUT: StdDuration = StdDuration::from_secs(15);

#[derive(Parser)]
#[command(
    name = "keywarden",
    version,
    about = "Manage keywarden API keys and run the keywarden server",
    after_help = "Key commands and `serve` read the secret from KEYWARDEN_SECRET or the file \
                  named by KEYWARDEN_SECRET_FILE (and old ones from KEYWARDEN_PREVIOUS_SECRETS, \
                  comma-separated, or KEYWARDEN_PREVIOUS_SECRETS_FILE, one per line); create \
                  one with `keywarden secret generate`."
)]
struct Cli {
    /// Database URL: sqlite://PATH or postgres://USER@HOST/DB [default: the config file's
    /// `database_url`, else sqlite://keywarden.db].
    #[arg(
        long,
        global = true,
        env = "KEYWARDEN_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    database_url: Option<String>,

    /// A TOML config file (see docs/deploy.md); flags and environment variables win over it.
    #[arg(long, global = true, env = "KEYWARDEN_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

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
    /// Read, check and prune the tamper-evident audit log of key changes.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Subscribe URLs to signed deliveries of key events (Standard Webhooks).
    #[command(subcommand)]
    Webhooks(webhooks::WebhooksCommand),
    /// Set the rate limit and credits all of an owner's keys share.
    #[command(subcommand)]
    Owners(owners::OwnersCommand),
    /// Application secrets.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Run the server: POST /v1/keys/verify, /v1/auth (forward auth), the management API
    /// (/admin/keys, /admin/audit, /admin/usage, /admin/owners, /admin/webhooks) and /whoami
    /// behind the layer, the admin UI (/admin/ui/), /healthz and /readyz (open), and the
    /// webhook deliveries. Settings: docs/deploy.md.
    Serve(ServeArgs),
}

/// A command failure: one line for stderr. Never holds key or secret material.
pub(crate) struct Failure(pub(crate) String);

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
pub(crate) fn load_secrets() -> Result<SecretRing, SecretError> {
    let (ring, warnings) = SecretRing::load(std::env::var_os)?;
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    Ok(ring)
}

/// The reveal key ring from the environment (read by the secrets' rules), if one is
/// configured; its warnings on stderr.
pub(crate) fn load_reveal_keys() -> Result<Option<RevealKeyRing>, RevealKeyError> {
    let Some((ring, warnings)) = RevealKeyRing::load(std::env::var_os)? else {
        return Ok(None);
    };
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    Ok(Some(ring))
}

/// The error's message followed by its sources' messages, skipping repeats.
pub(crate) fn with_sources(error: &dyn StdError) -> String {
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
    // `keywarden audit list | head`: a reader that closes the pipe ends the command quietly
    // (exit 141, as a shell reports SIGPIPE), not with a panic and a backtrace.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
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
    let file = match &cli.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let ctx = Context::new(cli.database_url, file);
    match cli.command {
        Command::Secret(command) => cli::secret(&ctx, command, out).await,
        Command::Migrate => cli::migrate(&ctx.database_url, out).await,
        Command::Serve(args) => serve::serve(&ctx, args, out).await,
        Command::Keys(command) => cli::keys(&ctx, command, out).await,
        Command::Audit(command) => audit::audit(&ctx, command, out).await,
        Command::Webhooks(command) => webhooks::webhooks(&ctx, command, out).await,
        Command::Owners(command) => owners::owners(&ctx, command, out).await,
    }
}

/// The database URL used when neither the flag, the environment nor the config file names one.
const DEFAULT_DATABASE_URL: &str = "sqlite://keywarden.db";

/// What every command shares: the database, the key format and the config file.
pub(crate) struct Context {
    pub(crate) database_url: String,
    /// The configured key prefixes; `None` is keywarden's default (`kw_live`, `kw_test`).
    pub(crate) key_format: Option<KeyFormat>,
    pub(crate) file: FileConfig,
}

impl Context {
    fn new(database_url: Option<String>, file: FileConfig) -> Self {
        let database_url = database_url
            .or_else(|| file.database_url.clone())
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        Self {
            database_url,
            key_format: file.key_prefixes.clone().map(|format| format.0),
            file,
        }
    }

    /// The Redis URL and namespace of the CLI's change notices and `serve`'s limits: the
    /// environment, else the config file.
    pub(crate) fn redis(&self) -> (Option<String>, String) {
        let url = std::env::var("KEYWARDEN_REDIS_URL")
            .ok()
            .filter(|url| !url.is_empty())
            .or_else(|| self.file.redis.url.clone());
        let namespace = std::env::var("KEYWARDEN_REDIS_NAMESPACE")
            .ok()
            .filter(|ns| !ns.is_empty())
            .or_else(|| self.file.redis.namespace.clone())
            .unwrap_or_else(|| DEFAULT_REDIS_NAMESPACE.to_owned());
        (url, namespace)
    }
}

/// The Redis namespace when none is configured.
pub(crate) const DEFAULT_REDIS_NAMESPACE: &str = "keywarden";

pub(crate) fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Opens (and migrates) the store named by `url`; the PostgreSQL store also as itself, for
/// LISTEN/NOTIFY.
pub(crate) async fn open_store(
    url: &str,
) -> Result<(Arc<dyn KeyStore>, Option<PostgresStore>), Failure> {
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
pub(crate) fn redact_url(url: &str) -> String {
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
