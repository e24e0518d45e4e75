//! `keywarden serve`: the demo service behind the layer, with the management API under
//! `/admin`, the verification API and forward auth for gateways (`keywarden::server`), until
//! Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use clap::builder::BoolishValueParser;
use clap::Args;
use keywarden::webhooks::{WebhookDeliverer, WebhookTargets};
use keywarden::{
    invalidation::{InvalidationListener, DEFAULT_MAX_BLIND, DEFAULT_POLL_INTERVAL, MIN_MAX_BLIND},
    ratelimit::{ClientAddressSource, FailedAttemptLimit, RateLimiter, TrustedProxies},
    redis::RedisBackend,
    rejection::RejectionKind,
    server::AuthServer,
    ApiKeyLayerBuilder, Collection, KeyManager, SecretRing,
};
use serde_json::json;
use tracing_subscriber::EnvFilter;

use crate::config::{ConfigDuration, ConfigHeader, ConfigNetwork, LogFormat};
use crate::demo::{demo_router, layer_builder_with, ADMIN_UI_PATH, DEMO_COLLECTIONS};
use crate::health::{self, Readiness};
use crate::output::Output;
use crate::{load_reveal_keys, load_secrets, open_store, with_sources, Context, Failure};

/// How long `serve` waits for requests in flight to finish after a shutdown signal, unless
/// configured.
const DEFAULT_SHUTDOWN_GRACE: StdDuration = StdDuration::from_secs(10);

/// Where `serve` listens unless configured.
const DEFAULT_ADDR: &str = "127.0.0.1:3000";

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (port 0 picks a free port) [default: 127.0.0.1:3000].
    #[arg(long, env = "KEYWARDEN_ADDR")]
    addr: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics, on a listener of their own (port 0
    /// picks a free port). Unauthenticated: bind it where only your scraper can reach it.
    #[arg(long, env = "KEYWARDEN_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<String>,
    /// Redis URL: rate limits shared by every instance, and pub/sub cache invalidation.
    #[arg(
        long,
        env = "KEYWARDEN_REDIS_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    redis_url: Option<String>,
    /// Prefix of every Redis key and channel; instances of one deployment share it
    /// [default: keywarden].
    #[arg(long, env = "KEYWARDEN_REDIS_NAMESPACE")]
    redis_namespace: Option<String>,
    /// The collections keys are accepted for, comma-separated [default: users,teams,services].
    #[arg(
        long,
        env = "KEYWARDEN_COLLECTIONS",
        value_delimiter = ',',
        value_name = "SLUG,..."
    )]
    collections: Option<Vec<String>>,
    /// The header a trusted proxy or gateway in front sets to the client's address (e.g.
    /// X-Real-IP): failed-attempt limiting blames that address and keys' IP allowlists check
    /// it (the verify API and forward auth check no allowlist without it). Set it only when
    /// every request comes through a proxy that overwrites the header.
    #[arg(long, env = "KEYWARDEN_CLIENT_ADDRESS_HEADER", value_name = "HEADER")]
    client_address_header: Option<ConfigHeader>,
    /// The addresses of those proxies (CIDR blocks, comma-separated): the header is then
    /// believed only on their connections, skipping their own hops, and anyone else is
    /// blamed itself. Needs --client-address-header.
    #[arg(
        long,
        env = "KEYWARDEN_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "CIDR,..."
    )]
    trusted_proxies: Option<Vec<ConfigNetwork>>,
    /// After a shutdown signal, how long to keep accepting requests while /readyz answers
    /// 503, so load balancers stop routing here first [default: 0s].
    #[arg(long, env = "KEYWARDEN_SHUTDOWN_DELAY", value_name = "DURATION")]
    shutdown_delay: Option<ConfigDuration>,
    /// How long a shutdown (SIGTERM, Ctrl-C) then waits for requests in flight [default: 10s].
    #[arg(long, env = "KEYWARDEN_SHUTDOWN_GRACE", value_name = "DURATION")]
    shutdown_grace: Option<ConfigDuration>,
    /// Only send webhooks to these hosts, comma-separated (`hooks.example.com`,
    /// `*.partner.example`) [default: any https host]. See docs/webhooks.md on SSRF.
    #[arg(
        long,
        env = "KEYWARDEN_WEBHOOK_HOSTS",
        value_delimiter = ',',
        value_name = "HOST,..."
    )]
    webhook_hosts: Option<Vec<String>>,
    /// Also allow plain-http webhook URLs (local receivers only). `=false` turns off what the
    /// config file turned on.
    #[arg(
        long,
        env = "KEYWARDEN_WEBHOOK_ALLOW_HTTP",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    webhook_allow_http: Option<bool>,
    /// Also allow webhooks to non-public addresses (loopback, private, link-local), which
    /// are refused by default (SSRF). `=false` turns off what the config file turned on.
    #[arg(
        long,
        env = "KEYWARDEN_WEBHOOK_ALLOW_PRIVATE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    webhook_allow_private: Option<bool>,
    /// Send `key.expiring` this long before a key expires [default: 7d].
    #[arg(long, env = "KEYWARDEN_WEBHOOK_EXPIRING_LEAD", value_name = "DURATION")]
    webhook_expiring_lead: Option<ConfigDuration>,
    /// Delete usage analytics (hourly request counts) older than this, hourly [default: 90d].
    #[arg(long, env = "KEYWARDEN_USAGE_RETENTION", value_name = "DURATION")]
    usage_retention: Option<ConfigDuration>,
    /// Delete audit events older than this, hourly (e.g. 90d); a sealed checkpoint keeps the
    /// rest verifiable [default: keep every event].
    #[arg(long, env = "KEYWARDEN_AUDIT_RETENTION", value_name = "DURATION")]
    audit_retention: Option<ConfigDuration>,
    /// Log format on stderr [default: text].
    #[arg(long, env = "KEYWARDEN_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter: a level (info, debug) or per-target directives (keywarden=debug,warn)
    /// [default: info].
    #[arg(long, env = "KEYWARDEN_LOG", value_name = "FILTER")]
    log_level: Option<String>,
    /// Log one line per request (method, route, status, code, milliseconds);
    /// `--log-requests=false` turns off what the config file turned on.
    #[arg(
        long,
        env = "KEYWARDEN_LOG_REQUESTS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    log_requests: Option<bool>,
    /// Let `POST /v1/keys/verify` requests from loopback connections verify keys without a
    /// caller key holding `keys:verify`. Only with a loopback --addr. RISK: every local
    /// process, and anything a local reverse proxy forwards, can then test keys.
    /// `=false` turns off what the config file turned on.
    #[arg(
        long,
        env = "KEYWARDEN_VERIFY_WITHOUT_KEY_ON_LOOPBACK",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    verify_without_key_on_loopback: Option<bool>,
    /// Poll the store's change feed this often: a revocation made on another instance (or by
    /// the CLI, or plain SQL) reaches this one within it, even with no notification
    /// [default: 2s].
    #[arg(long, env = "KEYWARDEN_REVOCATION_POLL", value_name = "DURATION")]
    revocation_poll: Option<ConfigDuration>,
    /// Use PostgreSQL LISTEN/NOTIFY as the fast path for changes [default: true]. `=false`
    /// behind a pooler in transaction mode (PgBouncer), where it cannot work; it is also
    /// detected at start and then logged.
    #[arg(
        long,
        env = "KEYWARDEN_REVOCATION_LISTEN",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    revocation_listen: Option<bool>,
    /// After this long without an answer from the change feed or a notification transport,
    /// stop serving cached keys read longer ago than that (they are re-checked; 503 while the
    /// store is out of reach) [default: 30s].
    #[arg(long, env = "KEYWARDEN_MAX_BLIND", value_name = "DURATION")]
    max_blind: Option<ConfigDuration>,
    /// Keep serving cached keys while blind, up to the cache TTL and stale window. RISK: a key
    /// revoked while this instance cannot reach the store is accepted here until its cache
    /// entry expires. `=false` turns off what the config file turned on.
    #[arg(
        long,
        env = "KEYWARDEN_PREFER_AVAILABILITY",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    prefer_availability: Option<bool>,
}

/// `serve`'s settings: each from its flag, else its environment variable, else the config
/// file, else the default.
struct Settings {
    addr: String,
    metrics_addr: Option<String>,
    redis_url: Option<String>,
    redis_namespace: String,
    collections: Vec<String>,
    client_address: Option<ClientAddressSource>,
    shutdown_delay: StdDuration,
    shutdown_grace: StdDuration,
    audit_retention: Option<StdDuration>,
    usage_retention: StdDuration,
    webhook_targets: WebhookTargets,
    webhook_expiring_lead: StdDuration,
    log_format: LogFormat,
    log_level: String,
    log_requests: bool,
    verify_without_key_on_loopback: bool,
    revocation_poll: StdDuration,
    revocation_listen: bool,
    max_blind: StdDuration,
    prefer_availability: bool,
    /// Risky but allowed choices, logged as warnings once logging is up.
    warnings: Vec<String>,
}

/// Trusted networks broader than these are probably more than the proxies: warned about.
const NARROWEST_WARNED_V4: u8 = 24;
const NARROWEST_WARNED_V6: u8 = 64;

impl Settings {
    fn new(ctx: &Context, args: ServeArgs) -> Result<Self, Failure> {
        let file = &ctx.file;
        let (env_redis_url, env_namespace) = ctx.redis();
        let header = args
            .client_address_header
            .or_else(|| file.server.client_address_header.clone())
            .map(|header| header.0);
        let proxies = args
            .trusted_proxies
            .or_else(|| file.server.trusted_proxies.clone());
        let mut warnings = Vec::new();
        if let Some(proxies) = &proxies {
            if proxies.is_empty() {
                return Err(Failure(
                    "trusted proxies: the list is empty (server.trusted_proxies)".into(),
                ));
            }
            for network in proxies.iter().map(|p| p.0) {
                if network.prefix() == 0 {
                    return Err(Failure(format!(
                        "trusted proxies may not be {network}: that trusts every address, \
                         so every client could choose its own"
                    )));
                }
                let narrowest = if network.addr().is_ipv4() {
                    NARROWEST_WARNED_V4
                } else {
                    NARROWEST_WARNED_V6
                };
                if network.prefix() < narrowest {
                    warnings.push(format!(
                        "trusted proxy network {network} is broad: every client inside it may \
                         choose the address it is blamed as; list the proxies' own addresses"
                    ));
                }
            }
        }
        let revocation_poll = args
            .revocation_poll
            .or(file.server.revocation_poll)
            .map_or(DEFAULT_POLL_INTERVAL, |d| d.0);
        let max_blind = args
            .max_blind
            .or(file.server.max_blind)
            .map_or(DEFAULT_MAX_BLIND, |d| d.0);
        if revocation_poll < StdDuration::from_millis(100) {
            return Err(Failure(format!(
                "revocation poll interval {revocation_poll:?} is too short: at least 100ms \
                 (server.revocation_poll)"
            )));
        }
        if max_blind < revocation_poll.saturating_mul(2) || max_blind < MIN_MAX_BLIND {
            return Err(Failure(format!(
                "max blind {max_blind:?} must be at least twice the revocation poll interval \
                 ({revocation_poll:?}) and at least {MIN_MAX_BLIND:?}: an instance hears from \
                 the feed once per poll, so a shorter bound would make it blind between two \
                 polls (server.max_blind)"
            )));
        }
        let prefer_availability = args
            .prefer_availability
            .or(file.server.prefer_availability)
            .unwrap_or(false);
        if prefer_availability {
            warnings.push(format!(
                "prefer_availability is on: while this instance cannot reach the store for \
                 longer than {max_blind:?} it keeps answering from its cache, and accepts a key \
                 revoked meanwhile until its cache entry expires"
            ));
        }
        let collections = args
            .collections
            .or_else(|| file.auth.collections.clone())
            .unwrap_or_else(|| DEMO_COLLECTIONS.map(str::to_owned).to_vec());
        if collections.is_empty() {
            return Err(Failure(
                "auth.collections is empty: name at least one collection".into(),
            ));
        }
        let client_address = match (header, proxies) {
            (Some(header), Some(proxies)) => Some(ClientAddressSource::TrustedProxies(
                TrustedProxies::new(header, proxies.into_iter().map(|p| p.0)),
            )),
            (Some(header), None) => {
                warnings.push(format!(
                    "{header} is believed on every connection: only safe when nothing but \
                     the proxy can reach this server, since a client that sets it itself \
                     chooses the address failed-attempt limiting blames and keys' IP \
                     allowlists check (set --trusted-proxies)"
                ));
                Some(ClientAddressSource::TrustedHeader(header))
            }
            (None, Some(_)) => {
                return Err(Failure(
                    "trusted proxies need the header they set: --client-address-header \
                     (server.client_address_header)"
                        .into(),
                ))
            }
            (None, None) => None,
        };
        Ok(Self {
            addr: args
                .addr
                .or_else(|| file.server.addr.clone())
                .unwrap_or_else(|| DEFAULT_ADDR.to_owned()),
            metrics_addr: args
                .metrics_addr
                .or_else(|| file.server.metrics_addr.clone()),
            // clap has read KEYWARDEN_REDIS_URL already; `ctx.redis()` adds the file.
            redis_url: args.redis_url.or(env_redis_url),
            redis_namespace: args.redis_namespace.unwrap_or(env_namespace),
            collections,
            client_address,
            shutdown_delay: args
                .shutdown_delay
                .or(file.server.shutdown_delay)
                .map_or(StdDuration::ZERO, |d| d.0),
            shutdown_grace: args
                .shutdown_grace
                .or(file.server.shutdown_grace)
                .map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            webhook_targets: webhook_targets(
                args.webhook_hosts
                    .or_else(|| file.server.webhook_hosts.clone()),
                args.webhook_allow_http
                    .or(file.server.webhook_allow_http)
                    .unwrap_or(false),
                args.webhook_allow_private
                    .or(file.server.webhook_allow_private)
                    .unwrap_or(false),
            ),
            webhook_expiring_lead: args
                .webhook_expiring_lead
                .or(file.server.webhook_expiring_lead)
                .map_or(StdDuration::from_secs(7 * 86_400), |d| d.0),
            usage_retention: args
                .usage_retention
                .or(file.server.usage_retention)
                .map_or(StdDuration::from_secs(90 * 86_400), |d| d.0),
            audit_retention: args
                .audit_retention
                .or(file.server.audit_retention)
                .map(|d| d.0),
            log_format: args.log_format.or(file.log.format).unwrap_or_default(),
            log_level: args
                .log_level
                .or_else(|| file.log.level.clone())
                .unwrap_or_else(|| "info".to_owned()),
            log_requests: args.log_requests.or(file.log.requests).unwrap_or(false),
            verify_without_key_on_loopback: args
                .verify_without_key_on_loopback
                .or(file.server.verify_without_key_on_loopback)
                .unwrap_or(false),
            revocation_poll,
            revocation_listen: args
                .revocation_listen
                .or(file.server.revocation_listen)
                .unwrap_or(true),
            max_blind,
            prefer_availability,
            warnings,
        })
    }

    /// The client address the layer and the verify API blame, if the deployment names one.
    fn client_address(&self) -> Option<ClientAddressSource> {
        self.client_address.clone()
    }
}

/// The layer as configured: collections, key format, headers, cache and limits.
fn layer_builder(ctx: &Context, settings: &Settings) -> Result<ApiKeyLayerBuilder, Failure> {
    let file = &ctx.file;
    let opaque = file.auth.opaque_collections.clone().unwrap_or_default();
    if let Some(slug) = opaque
        .iter()
        .find(|slug| !settings.collections.contains(slug))
    {
        return Err(Failure(format!(
            "config auth.opaque_collections names {slug:?}, which is not one of the collections"
        )));
    }
    let owner_limits = file.auth.owner_rate_limits.clone().unwrap_or_default();
    if let Some(slug) = owner_limits
        .keys()
        .find(|slug| !settings.collections.contains(slug))
    {
        return Err(Failure(format!(
            "config auth.owner_rate_limits names {slug:?}, which is not one of the collections ({})",
            settings.collections.join(", ")
        )));
    }
    let mut builder = layer_builder_with(settings.collections.iter().map(|slug| {
        let collection = if opaque.contains(slug) {
            Collection::opaque(slug.clone())
        } else {
            Collection::new(slug.clone())
        };
        match owner_limits.get(slug) {
            Some(policy) => collection.owner_rate_limit(policy.0),
            None => collection,
        }
    }));
    if let Some(format) = &ctx.key_format {
        builder = builder.key_format(format.clone());
    }
    for header in file.auth.headers.iter().flatten() {
        builder = builder.header(header.0.as_str());
    }
    if let Some(policy) = &file.auth.default_rate_limit {
        builder = builder.default_rate_limit(policy.0);
    }
    match (
        file.auth.max_failed_attempts,
        file.auth.failed_attempt_window,
    ) {
        (Some(max), window) => {
            let window = window.map_or(StdDuration::from_secs(60), |w| w.0);
            // The client address comes from the layer's source, set below.
            builder = builder.failed_attempt_limit(FailedAttemptLimit::new(max, window));
        }
        (None, Some(_)) => {
            return Err(Failure(
                "config auth.failed_attempt_window needs auth.max_failed_attempts".into(),
            ))
        }
        (None, None) => {}
    }
    if let Some(source) = settings.client_address() {
        // One address per request, for failed-attempt limiting and keys' IP allowlists.
        builder = builder.client_address(source);
    }
    let cache = &file.cache;
    if let Some(ttl) = cache.ttl {
        builder = builder.cache_ttl(ttl.0);
    }
    if let Some(ttl) = cache.negative_ttl {
        builder = builder.negative_cache_ttl(ttl.0);
    }
    if let Some(capacity) = cache.capacity {
        builder = builder.cache_capacity(capacity);
    }
    if let Some(window) = cache.stale_window {
        builder = builder.stale_window(window.0);
    }
    if let Some(timeout) = cache.store_timeout {
        builder = builder.store_timeout(timeout.0);
    }
    if let Some(interval) = cache.usage_flush_interval {
        builder = builder.usage_flush_interval(Some(interval.0));
    }
    if cache.credit_lease_block.is_some() || cache.credit_lease_idle.is_some() {
        let block = cache.credit_lease_block.unwrap_or(100);
        if block == 0 {
            return Err(Failure(
                "config cache.credit_lease_block must be at least 1".to_owned(),
            ));
        }
        let idle = cache
            .credit_lease_idle
            .map_or(StdDuration::from_secs(10), |d| d.0);
        builder = builder.credit_leases(block, idle);
    }
    Ok(builder)
}

/// Logs to stderr in the configured format. Errors only for a filter that does not parse.
fn init_logging(settings: &Settings) -> Result<(), Failure> {
    let invalid = |why: String| {
        Failure(format!(
            "invalid log filter {:?}: {why}",
            settings.log_level.chars().take(64).collect::<String>()
        ))
    };
    // EnvFilter takes a bare unknown word (`infoo`) for a target and then logs nothing: a
    // directive is a level, or `target=level`.
    for directive in settings.log_level.split(',').map(str::trim) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(invalid(format!(
                "expected a level ({}) or target=level",
                LEVELS.join(", ")
            )));
        }
    }
    let filter = EnvFilter::try_new(&settings.log_level).map_err(|e| invalid(e.to_string()))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second subscriber (a test calling serve twice in one process) keeps the first.
    let _ = match settings.log_format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    Ok(())
}

/// The levels a log filter directive may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// One log line per request: method, route, status, keywarden's rejection code if any, and
/// the time taken. The route is the matched pattern (`/admin/keys/{id}`); an unmatched path
/// is logged with every segment that could be a key (longer than 16 bytes) redacted, and
/// never with its query (which may carry a key).
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = match request.extensions().get::<MatchedPath>() {
        Some(route) => route.as_str().to_owned(),
        None => redacted_path(request.uri().path()),
    };
    let started = Instant::now();
    let response = next.run(request).await;
    let code = response
        .extensions()
        .get::<RejectionKind>()
        .map_or("", |kind| kind.code());
    tracing::info!(
        target: "keywarden::access",
        method = %method,
        // A URI path holds no control characters or spaces (http::Uri refuses them).
        path = %path,
        status = response.status().as_u16(),
        code,
        millis = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
        "request"
    );
    response
}

/// A duration as the CLI takes it back: `2s`, `500ms`.
fn humantime_secs(duration: StdDuration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// `path` with each segment longer than 16 bytes (a key, a token, an id) replaced by `{…}`.
fn redacted_path(path: &str) -> String {
    path.split('/')
        .map(|segment| if segment.len() > 16 { "{…}" } else { segment })
        .collect::<Vec<_>>()
        .join("/")
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

pub(crate) async fn serve(ctx: &Context, args: ServeArgs, out: Output) -> Result<(), Failure> {
    let settings = Settings::new(ctx, args)?;
    init_logging(&settings)?;
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }
    if settings.verify_without_key_on_loopback {
        if !listens_on_loopback_only(&settings.addr) {
            return Err(Failure(format!(
                "--verify-without-key-on-loopback needs a loopback --addr (127.0.0.1, [::1]), \
                 not {}",
                settings.addr
            )));
        }
        tracing::warn!(
            "POST /v1/keys/verify needs no caller key on loopback connections: every local \
             process can test keys"
        );
    }
    let secrets = load_secrets()?;
    let reveal_keys = load_reveal_keys()?;
    let ring_ids = ring_ids(&secrets);
    let (store, postgres) = open_store(&ctx.database_url).await?;
    let redis = match &settings.redis_url {
        Some(redis_url) => Some(
            RedisBackend::connect(redis_url, &settings.redis_namespace)
                .await
                .map_err(|e| Failure(format!("cannot use Redis: {e}")))?,
        ),
        None => None,
    };
    // Before the layer: it registers its metrics with the recorder installed when it is built.
    let metrics = match &settings.metrics_addr {
        Some(addr) => Some(crate::metrics::start(addr).await?),
        None => None,
    };
    let mut builder = layer_builder(ctx, &settings)?
        .store(store.clone())
        .secrets(secrets);
    if let Some(redis) = &redis {
        builder = builder.rate_limiter(RateLimiter::redis(redis));
    }
    let layer = builder
        .build()
        .map_err(|e| Failure(format!("invalid configuration: {e}")))?;
    let mut manager = KeyManager::for_layer(&layer);
    if let Some(format) = &ctx.key_format {
        manager = manager.with_key_format(format.clone());
    }
    if let Some(reveal_keys) = reveal_keys {
        manager = manager.with_reveal_keys(reveal_keys);
    }
    manager = manager.with_webhook_targets(settings.webhook_targets.clone());
    prune_hourly(
        manager.clone(),
        settings.audit_retention,
        settings.usage_retention,
    );
    // A subscription these targets refuse would fail for ever, like a receiver that is down:
    // say so now, once, rather than let it look like an outage.
    if let Ok(hooks) = manager.list_webhooks().await {
        for hook in hooks.iter().filter(|h| !h.disabled) {
            if let Err(reason) = settings.webhook_targets.check(&hook.url) {
                tracing::warn!(
                    target: "keywarden",
                    webhook_id = %hook.id,
                    %reason,
                    "a webhook points where this server may not send (see --webhook-hosts, \
                     --webhook-allow-http, --webhook-allow-private); its deliveries will fail"
                );
            }
        }
    }
    // Deliveries are leased per subscription in the store: every instance may run this.
    let _deliverer = WebhookDeliverer::new(layer.store().clone(), layer.secrets())
        .targets(settings.webhook_targets.clone())
        .expiring_lead(
            time::Duration::try_from(settings.webhook_expiring_lead)
                .unwrap_or(time::Duration::days(7)),
        )
        .start(StdDuration::from_secs(1));
    // Other instances' changes arrive through the store's change feed (polled), with NOTIFY
    // (PostgreSQL) and/or Redis pub/sub as the fast path.
    let mut revocation = InvalidationListener::builder(&layer)
        .poll_every(settings.revocation_poll)
        .max_blind(settings.max_blind);
    if settings.prefer_availability {
        revocation = revocation.prefer_availability();
    }
    if let Some(postgres) = &postgres {
        if settings.revocation_listen {
            revocation = revocation.postgres(postgres);
        } else {
            tracing::info!(
                target: "keywarden",
                poll_every = ?settings.revocation_poll,
                "LISTEN/NOTIFY switched off: changes made elsewhere arrive by polling the change feed"
            );
        }
    }
    if let Some(redis) = &redis {
        manager = manager.publishes_to(redis.clone());
        revocation = revocation.redis(redis);
    }
    let revocation = Arc::new(
        revocation
            .start()
            .await
            .map_err(|e| Failure(format!("cannot follow changes made elsewhere: {e}")))?,
    );
    match revocation.path().as_str() {
        "ttl" => tracing::warn!(
            target: "keywarden",
            "no change feed and no notification transport: changes made elsewhere reach this \
             instance only when cache entries expire"
        ),
        path => tracing::info!(target: "keywarden", path, "following changes made elsewhere"),
    }
    let mut auth_server = AuthServer::new(layer.clone());
    if let Some(source) = settings.client_address() {
        auth_server = auth_server.client_address(source);
    }
    if settings.verify_without_key_on_loopback {
        auth_server = auth_server.verify_without_caller_key_from_loopback();
    }
    let readiness = Arc::new(Readiness::new(store, redis.clone()).revocation(revocation.clone()));
    let mut app = demo_router(layer.clone(), Arc::new(manager))
        .merge(auth_server.router())
        .merge(health::router(readiness.clone()));
    if settings.log_requests {
        app = app.layer(axum::middleware::from_fn(log_request));
    }
    let listener = tokio::net::TcpListener::bind(&settings.addr)
        .await
        .map_err(|e| Failure(format!("cannot listen on {}: {e}", settings.addr)))?;
    let local = listener
        .local_addr()
        .map_err(|e| Failure(format!("cannot read the listening address: {e}")))?;
    tracing::info!(addr = %local, collections = %settings.collections.join(","), "listening");
    if let Some(metrics) = &metrics {
        tracing::info!(addr = %metrics.addr, "serving metrics at /metrics");
    }
    if out.json {
        let mut line = json!({
            "listening": format!("http://{local}"),
            "revocation": revocation.path(),
        });
        if let Some(metrics) = &metrics {
            line["metrics"] = format!("http://{}/metrics", metrics.addr).into();
        }
        println!("{line}");
    } else {
        println!("listening on http://{local}");
        if let Some(metrics) = &metrics {
            println!("metrics on http://{}/metrics", metrics.addr);
        }
        println!("{ring_ids}");
        if let Some(ui) = ADMIN_UI_PATH {
            println!("admin UI: http://{local}{ui}");
        }
        println!(
            "routes: GET /healthz and /readyz (open), GET /whoami, /admin/keys, /admin/audit, \
             /admin/usage, /admin/owners, /admin/webhooks (API key required; collections {}), \
             POST /v1/keys/verify ({}), /v1/auth (forward auth for gateways), \
             GET /v1/openapi.json",
            settings.collections.join(", "),
            if settings.verify_without_key_on_loopback {
                "caller scope keys:verify, or no key from loopback"
            } else {
                "caller scope keys:verify"
            }
        );
        let poll = humantime_secs(settings.revocation_poll);
        let propagation = match revocation.path().as_str() {
            "ttl" => "within the cache TTL (60 s)".to_owned(),
            path if path.contains("listen") => {
                format!("at once ({path}; at the latest within {poll})")
            }
            path if path.contains("redis") => format!(
                "within {poll} ({path}; at once when the CLI publishes to the same \
                 KEYWARDEN_REDIS_URL and KEYWARDEN_REDIS_NAMESPACE)"
            ),
            path => format!("within {poll} ({path})"),
        };
        println!(
            "changes made through /admin apply at once; changes made by other processes \
             (e.g. `keywarden keys revoke`) {propagation}"
        );
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The connection's address: the loopback check of the verify API, failed-attempt limits.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let draining = readiness.clone();
    let delay = settings.shutdown_delay;
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        // /readyz answers 503 from here on. During the delay everything else is still
        // served, so load balancers take this instance out before it stops accepting.
        draining.drain();
        if !delay.is_zero() {
            tracing::info!("shutdown signal: /readyz now fails; accepting requests for {delay:?}");
            tokio::time::sleep(delay).await;
        }
        // New connections are refused from here on; requests in flight run to the end.
        tracing::info!("shutting down: draining requests in flight");
        let _ = stop_tx.send(());
    });
    let server = tokio::spawn(async move { server.await });
    // Stop waiting for slow clients a while after the signal rather than hanging forever.
    let grace = settings.shutdown_grace;
    let result = match tokio::select! {
        result = server => Some(result),
        _ = async {
            let _ = stop_rx.await;
            tokio::time::sleep(grace).await;
        } => None,
    } {
        Some(Ok(Ok(()))) => Ok(()),
        Some(Ok(Err(e))) => Err(Failure(format!("server error: {e}"))),
        Some(Err(e)) => Err(Failure(format!("server task failed: {e}"))),
        None => {
            tracing::warn!(
                "requests still in flight after the shutdown grace period ({grace:?}); stopping"
            );
            Ok(())
        }
    };
    // Uses are written behind in batches: write the last ones before exiting.
    match layer.flush_usage().await {
        Ok(()) => tracing::info!("recorded the last key uses"),
        Err(error) => {
            tracing::error!(error = %with_sources(&error), "could not record the last key uses");
            eprintln!("warning: could not record the last key uses: {error}");
        }
    }
    // Credits leased and not spent go back, for the other instances.
    layer.return_credits().await;
    drop(revocation);
    tracing::info!("shut down");
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

/// Deletes audit events and usage counts past their retention, now and every hour (each
/// instance may run it: pruning is idempotent).
fn prune_hourly(manager: KeyManager, audit: Option<StdDuration>, usage: StdDuration) {
    let span = |d: StdDuration| time::Duration::try_from(d).unwrap_or(time::Duration::MAX);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(StdDuration::from_secs(3600));
        loop {
            every.tick().await;
            if let Some(retention) = audit {
                match manager.prune_audit(span(retention)).await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::info!(
                        target: "keywarden",
                        deleted,
                        "pruned audit events past the retention period"
                    ),
                    Err(error) => tracing::warn!(
                        target: "keywarden",
                        %error,
                        "pruning the audit log failed; retrying in an hour"
                    ),
                }
            }
            if let Err(error) = manager.prune_usage(span(usage)).await {
                tracing::warn!(
                    target: "keywarden",
                    %error,
                    "pruning usage analytics failed; retrying in an hour"
                );
            }
        }
    });
}

/// The webhook targets: the host allowlist (none: any host) and whether plain http is allowed.
pub(crate) fn webhook_targets(
    hosts: Option<Vec<String>>,
    allow_http: bool,
    allow_private: bool,
) -> WebhookTargets {
    match hosts {
        Some(hosts) => WebhookTargets::hosts(hosts.into_iter().filter(|h| !h.trim().is_empty())),
        None => WebhookTargets::any(),
    }
    .allow_http(allow_http)
    .allow_private(allow_private)
}
