//! `keywarden serve`: the demo service behind the layer, with the management API under
//! `/admin`, the verification API and forward auth for gateways (`keywarden::server`), until
//! Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use clap::Args;
use keywarden::{
    invalidation::InvalidationListener, ratelimit::RateLimiter, redis::RedisBackend,
    server::AuthServer, KeyManager, SecretRing,
};
use serde_json::json;

use crate::demo::{demo_layer_builder, demo_router};
use crate::output::Output;
use crate::{load_reveal_keys, load_secrets, open_store, Failure};

/// How long `serve` waits for open connections to finish after a shutdown signal.
const SHUTDOWN_GRACE: StdDuration = StdDuration::from_secs(10);

#[derive(Args)]
pub(crate) struct ServeArgs {
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
    /// Let `POST /v1/keys/verify` requests from loopback connections verify keys without a
    /// caller key holding `keys:verify`. Only with a loopback --addr. RISK: every local
    /// process, and anything a local reverse proxy forwards, can then test keys.
    #[arg(long)]
    verify_without_key_on_loopback: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics, on a listener of their own (port 0
    /// picks a free port). Unauthenticated: bind it where only your scraper can reach it.
    #[arg(long, env = "KEYWARDEN_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<String>,
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

pub(crate) async fn serve(url: &str, args: ServeArgs, out: Output) -> Result<(), Failure> {
    if args.verify_without_key_on_loopback && !listens_on_loopback_only(&args.addr) {
        return Err(Failure(format!(
            "--verify-without-key-on-loopback needs a loopback --addr (127.0.0.1, [::1]), not {}",
            args.addr
        )));
    }
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
    // Before the layer: it registers its metrics with the recorder installed when it is built.
    let metrics = match &args.metrics_addr {
        Some(addr) => Some(crate::metrics::start(addr).await?),
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
    let mut auth_server = AuthServer::new(layer.clone());
    if args.verify_without_key_on_loopback {
        auth_server = auth_server.verify_without_caller_key_from_loopback();
    }
    let app = demo_router(layer.clone(), Arc::new(manager)).merge(auth_server.router());
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
        if let Some(metrics) = &metrics {
            println!("metrics on http://{}/metrics", metrics.addr);
        }
        println!("{ring_ids}");
        println!(
            "routes: GET /healthz (open), GET /whoami, /admin/keys (API key required; \
             collections users, teams, services), POST /v1/keys/verify (caller scope \
             keys:verify), /v1/auth (forward auth for gateways)"
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
    // The connection's address: the loopback check of the verify API.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
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

/// Whether `addr` (`host:port`) can only be reached from this host.
fn listens_on_loopback_only(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|addr| addr.ip().is_loopback())
        || addr
            .rsplit_once(':')
            .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
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
