//! Quickstart: an API-key protected demo server on embedded SQLite, with no setup.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! In the current directory it keeps `keywarden.db` (the keys' digests, never the keys; the same
//! file the `keywarden` CLI uses by default) and, unless `KEYWARDEN_SECRET` or
//! `KEYWARDEN_SECRET_FILE` is set,
//! `.keywarden-dev-secret` (a generated development secret, mode 0600). On the first run it
//! creates an admin key (scope `keys:admin`) and prints it once with ready-to-paste curl
//! commands; then it serves `GET /healthz`, `GET /whoami`, the management API under `/admin`
//! and the admin UI at `/admin/ui/` (feature `admin-ui`, on by default) on `127.0.0.1:3000`
//! (`KEYWARDEN_ADDR` overrides) until Ctrl-C.

use std::error::Error;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use keywarden::{
    secret::SECRET_ENV, secret::SECRET_FILE_ENV, store::KeyQuery, Collection, KeyManager, NewKey,
    SecretRing, SqliteStore,
};

// The same demo service as `keywarden serve`: one file, private to the binary and this example.
#[path = "../src/bin/keywarden/demo.rs"]
mod demo;

use demo::{demo_router, layer_builder_with, ADMIN_UI_PATH, DEMO_COLLECTIONS};

const DATABASE_URL: &str = "sqlite://keywarden.db";
const DATABASE_FILE: &str = "keywarden.db";
const SECRET_FILE: &str = ".keywarden-dev-secret";
const DEFAULT_ADDR: &str = "127.0.0.1:3000";

/// Where the secret came from, to tell the user how to reuse it with the CLI.
enum SecretSource {
    Environment,
    DevFile,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn Error>> {
    let (secrets, source) = load_secrets()?;
    let store = Arc::new(SqliteStore::connect(DATABASE_URL).await?);
    let layer = layer_builder_with(DEMO_COLLECTIONS.map(Collection::new))
        .store(store)
        .secrets(secrets)
        .build()?;
    let manager = Arc::new(KeyManager::for_layer(&layer));

    // Bind before creating the first key, so a busy port fails before the key is used up.
    let addr = std::env::var("KEYWARDEN_ADDR").unwrap_or_else(|_| DEFAULT_ADDR.to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
        format!("cannot listen on {addr}: {e} (set KEYWARDEN_ADDR to another address)")
    })?;
    let base = format!("http://{}", listener.local_addr()?);

    let existing = manager
        .list(&KeyQuery {
            limit: 1,
            ..KeyQuery::new()
        })
        .await?;
    if existing.items.is_empty() {
        let created = manager
            .create(
                NewKey::new("quickstart admin", "admin")
                    .description("created by the quickstart example")
                    .scope("keys:admin"),
            )
            .await?;
        let key = created.key.expose();
        println!(
            "Created the first admin key (collection users, subject admin, scope keys:admin)."
        );
        println!("It is shown only this once; keywarden stores only its digest:");
        println!();
        println!("    {key}");
        println!();
        println!("Try it from another terminal:");
        println!();
        println!("    curl -i {base}/healthz");
        println!("    curl -i -H 'Authorization: users API-Key {key}' {base}/whoami");
        println!("    curl -i -H 'Authorization: Bearer {key}' {base}/whoami");
        println!("    curl -i -H 'X-Api-Key: {key}' {base}/whoami");
        println!("    curl -i -H 'X-Api-Key: {key}' {base}/admin/keys");
    } else {
        println!(
            "A key already exists in {DATABASE_FILE}. Keys are shown only when they are created, \
             so it cannot be printed again."
        );
        println!("Create another one with the CLI (same database, same secret):");
        println!();
        let env = match source {
            SecretSource::DevFile => format!("{SECRET_FILE_ENV}={SECRET_FILE} "),
            SecretSource::Environment => String::new(),
        };
        println!(
            "    {env}cargo run --features cli --bin keywarden -- keys create --name admin2 \
             --subject admin --scope keys:admin"
        );
        println!();
        println!("(or delete {DATABASE_FILE}* to start over.)");
    }
    println!();
    if let Some(ui) = ADMIN_UI_PATH {
        println!("admin UI: {base}{ui} (sign in by pasting a keys:admin key)");
    }
    println!("listening on {base} (press Ctrl-C to stop)");

    axum::serve(listener, demo_router(layer.clone(), manager))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Uses are written behind in batches: write the last ones before exiting.
    layer.flush_usage().await?;
    println!("shut down");
    Ok(())
}

/// The secret ring from `KEYWARDEN_SECRET` / `KEYWARDEN_SECRET_FILE` if either is set;
/// otherwise from the development secret file, created on first use. Both go through the
/// library's loader (`SecretRing::load`), as the CLI does, so a value means the same secret
/// here and there.
fn load_secrets() -> Result<(SecretRing, SecretSource), Box<dyn Error>> {
    let configured = [SECRET_ENV, SECRET_FILE_ENV]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
    let path = Path::new(SECRET_FILE);
    let source = if configured {
        SecretSource::Environment
    } else if path.exists() {
        eprintln!(
            "warning: using the DEVELOPMENT secret in ./{SECRET_FILE}; set {SECRET_ENV} in production."
        );
        SecretSource::DevFile
    } else {
        let secret = keywarden::Secret::generate();
        write_private(path, secret.expose())
            .map_err(|e| format!("cannot write {SECRET_FILE}: {e}"))?;
        eprintln!(
            "********************************************************************************"
        );
        eprintln!("* warning: generated a DEVELOPMENT secret and saved it to ./{SECRET_FILE}");
        eprintln!(
            "* (mode 0600). It is for local development only: anyone who reads that file can"
        );
        eprintln!(
            "* check guessed keys offline. In production, run `keywarden secret generate` and"
        );
        eprintln!(
            "* pass the result in {SECRET_ENV} from your secret manager. Keys made with this"
        );
        eprintln!("* secret only verify while the same secret is used.");
        eprintln!(
            "********************************************************************************"
        );
        SecretSource::DevFile
    };
    let (ring, warnings) = SecretRing::load(|name| match source {
        SecretSource::Environment => std::env::var_os(name),
        // The development file stands in for KEYWARDEN_SECRET_FILE (previous secrets still
        // come from the environment).
        SecretSource::DevFile if name == SECRET_FILE_ENV => Some(SECRET_FILE.into()),
        SecretSource::DevFile if name == SECRET_ENV => None,
        SecretSource::DevFile => std::env::var_os(name),
    })
    .map_err(|e| format!("{e}"))?;
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    Ok((ring, source))
}

/// Creates `path` readable only by its owner (on Unix) and writes `bytes` and a newline.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.write_all(b"\n")?;
    file.sync_all()
}
