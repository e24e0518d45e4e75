//! Failed-attempt limiting per client address: after `max_failures` rejected keys from one
//! address within a window, that address gets `rate_limited` before any store work.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Extensions, HeaderMap, HeaderName};

use crate::clock::Clock;
use crate::net::{canonical, IpNetwork};
use crate::rejection::RateLimitStatus;

/// The client address as seen by the application, for servers that are not axum: insert it
/// into request extensions before the layer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// Where the client address of a request comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientAddressSource {
    /// The connection's peer address: axum's `ConnectInfo<SocketAddr>`, a [`ClientIp`] or a
    /// `SocketAddr` in the request extensions. Plain `axum::serve(listener, app)` provides
    /// none: serve `app.into_make_service_with_connect_info::<SocketAddr>()`. tonic and hyper
    /// servers insert a [`ClientIp`] themselves (tonic's own connect-info type is not read).
    /// A request without an address is not counted, and the layer logs a warning once.
    #[default]
    Connection,
    /// A header set by a trusted reverse proxy (`X-Forwarded-For`, `X-Real-IP`): its last
    /// comma-separated entry, the one the proxy itself appended. Requests without it fall
    /// back to the connection's address. Only use this behind a proxy that always sets it,
    /// or clients can choose their own address.
    TrustedHeader(HeaderName),
    /// A header set by reverse proxies at known addresses (`X-Forwarded-For`), believed only
    /// on a connection from one of them: see [`TrustedProxies`]. A connection from anywhere
    /// else is the client itself, whatever headers it sends.
    TrustedProxies(TrustedProxies),
}

/// The reverse proxies in front of a server, and the header they append the client's address
/// to. On a connection from a trusted proxy the header's entries are read from the right
/// (several header lines count as one list, in order), skipping the addresses of trusted
/// proxies: the first other address is the client, as nginx's `real_ip_recursive` does. When
/// every entry is a trusted proxy the leftmost is the client; when the header is missing or
/// its last untrusted entry is not an address, the connection's address is used.
///
/// ```
/// use keywarden::net::IpNetwork;
/// use keywarden::ratelimit::{ClientAddressSource, TrustedProxies};
///
/// let proxies = TrustedProxies::new(
///     "x-forwarded-for".parse().unwrap(),
///     ["10.0.0.0/8".parse::<IpNetwork>().unwrap(), "::1".parse().unwrap()],
/// );
/// let source = ClientAddressSource::TrustedProxies(proxies);
/// # let _ = source;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxies {
    header: HeaderName,
    networks: Arc<[IpNetwork]>,
}

impl TrustedProxies {
    /// Proxies at `networks` that append the client's address to `header`.
    pub fn new(header: HeaderName, networks: impl IntoIterator<Item = IpNetwork>) -> Self {
        Self {
            header,
            networks: networks.into_iter().collect(),
        }
    }

    /// The header the proxies set.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// The proxies' networks.
    pub fn networks(&self) -> &[IpNetwork] {
        &self.networks
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|network| network.contains(ip))
    }

    /// The client behind a connection from `peer`: `peer` itself unless it is a trusted
    /// proxy; else the header's rightmost address that is not a trusted proxy (or its
    /// leftmost, when all are); `peer` when the proxy forwarded no usable address.
    pub fn client(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        self.forwarded_client(headers, peer)
            .unwrap_or_else(|| canonical(peer))
    }

    /// The client behind a connection from `peer`, strictly, for a key's IP allowlist:
    /// `peer` itself unless it is a trusted proxy; else the header's rightmost address that
    /// is not a trusted proxy. `None` when there is none to believe: no header, garbage where
    /// a hop should be, or only trusted proxies' addresses (a proxy that forwarded nothing,
    /// behind one that appended it) — never a proxy's own address.
    pub fn origin(&self, headers: &HeaderMap, peer: IpAddr) -> Option<IpAddr> {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        for value in headers.get_all(&self.header).iter().rev() {
            for entry in value.as_bytes().rsplit(|&b| b == b',') {
                let ip = parse_address(entry)?;
                if !self.is_trusted(ip) {
                    return Some(ip);
                }
            }
        }
        None
    }

    /// Like [`client`](Self::client), but `None` when `peer` is a trusted proxy that
    /// forwarded no usable address (no header, or garbage where its hop should be): for a
    /// server answering on behalf of many clients, which must not blame the proxy itself.
    pub fn forwarded_client(&self, headers: &HeaderMap, peer: IpAddr) -> Option<IpAddr> {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        let mut leftmost = None;
        for value in headers.get_all(&self.header).iter().rev() {
            for entry in value.as_bytes().rsplit(|&b| b == b',') {
                let Some(ip) = parse_address(entry) else {
                    // Garbage where the next hop should be: nothing to the left of it can be
                    // believed; the last trusted hop is the best we know.
                    return leftmost;
                };
                if !self.is_trusted(ip) {
                    return Some(ip);
                }
                leftmost = Some(ip);
            }
        }
        leftmost
    }
}

impl ClientAddressSource {
    /// The client address of a request with these `headers` and `extensions`: the trusted
    /// header's last entry, else the connection's address; `None` when neither is known.
    pub fn address(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<IpAddr> {
        if let Self::TrustedProxies(proxies) = self {
            return connection_address(extensions).map(|peer| proxies.client(headers, peer));
        }
        if let Self::TrustedHeader(name) = self {
            if let Some(ip) = headers
                .get_all(name)
                .iter()
                .next_back()
                .and_then(|value| last_address(value.as_bytes()))
            {
                return Some(ip);
            }
        }
        connection_address(extensions)
    }

    /// The address a key's IP allowlist is checked against: like [`address`](Self::address),
    /// but never a proxy's own address in place of its client's. A trusted header that is
    /// missing or unusable, or trusted proxies that forwarded no usable hop
    /// ([`TrustedProxies::origin`]), give `None` (unknown, so a key with an allowlist is
    /// refused) rather than a proxy's address.
    pub fn origin_address(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<IpAddr> {
        match self {
            Self::Connection => connection_address(extensions),
            Self::TrustedHeader(_) => self.forwarded_address(headers),
            Self::TrustedProxies(proxies) => {
                let peer = connection_address(extensions)?;
                proxies.origin(headers, peer)
            }
        }
    }

    /// The address the trusted header names, without falling back to the connection's;
    /// `None` for [`Connection`](Self::Connection), and for
    /// [`TrustedProxies`](Self::TrustedProxies), which cannot believe a header without
    /// knowing the connection (use [`address`](Self::address)). For servers that answer on
    /// behalf of many clients (a verification service behind a gateway), where the
    /// connection's address is the gateway's.
    pub fn forwarded_address(&self, headers: &HeaderMap) -> Option<IpAddr> {
        match self {
            Self::TrustedHeader(name) => headers
                .get_all(name)
                .iter()
                .next_back()
                .and_then(|value| last_address(value.as_bytes())),
            Self::Connection | Self::TrustedProxies(_) => None,
        }
    }
}

/// The client of a credential checked without a request of its own (a verification API,
/// forward auth): the address a rejected key counts against, and the address the key's IP
/// allowlist is checked against. They differ where a gateway answers for many clients: the
/// gateway may be blamed as a direct caller, but is never taken for its client's origin.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ClientAddresses {
    pub(crate) blamed: Option<IpAddr>,
    pub(crate) origin: Option<IpAddr>,
}

impl ClientAddresses {
    /// One address for both.
    pub(crate) fn same(client: Option<IpAddr>) -> Self {
        Self {
            blamed: client,
            origin: client,
        }
    }
}

/// What a client address that is over its failure budget may still do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BlockedClients {
    /// Every request with a credential gets `rate_limited` (default: fail closed).
    #[default]
    RejectAll,
    /// Keys already in the cache as valid still work; anything that would need the store is
    /// `rate_limited`. A user who shares an address with an attacker keeps working.
    AllowCachedKeys,
}

/// Failed-attempt limiting: configuration for
/// [`ApiKeyLayerBuilder::failed_attempt_limit`](crate::ApiKeyLayerBuilder::failed_attempt_limit).
///
/// Malformed, unknown, expired and revoked keys count as failures; missing credentials,
/// scope and rate-limit rejections do not.
///
/// ```
/// use std::time::Duration;
/// use keywarden::{ratelimit::BlockedClients, ratelimit::ClientAddressSource, ratelimit::FailedAttemptLimit};
///
/// let limit = FailedAttemptLimit::new(20, Duration::from_secs(60))
///     .client_address(ClientAddressSource::TrustedHeader("x-real-ip".parse().unwrap()))
///     .blocked_clients(BlockedClients::AllowCachedKeys);
/// # let _ = limit;
/// ```
#[derive(Debug, Clone)]
pub struct FailedAttemptLimit {
    pub(crate) max_failures: NonZeroU32,
    pub(crate) window: Duration,
    /// `None`: the layer's ([`ApiKeyLayerBuilder::client_address`](crate::ApiKeyLayerBuilder::client_address),
    /// else the connection); the layer's build fills it in.
    pub(crate) address: Option<ClientAddressSource>,
    pub(crate) blocked: BlockedClients,
    pub(crate) capacity: u64,
}

impl FailedAttemptLimit {
    /// At most `max_failures` (at least 1) rejected keys per address per `window`.
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures: NonZeroU32::new(max_failures).unwrap_or(NonZeroU32::MIN),
            window: window.max(Duration::from_millis(1)),
            address: None,
            blocked: BlockedClients::RejectAll,
            capacity: 100_000,
        }
    }

    /// Where the address comes from (default: the layer's
    /// [`client_address`](crate::ApiKeyLayerBuilder::client_address), else the connection).
    /// Setting it here and a different source on the layer is a build error: the layer reads
    /// one address per request, for this and for keys' IP allowlists alike.
    #[must_use]
    pub fn client_address(mut self, address: ClientAddressSource) -> Self {
        self.address = Some(address);
        self
    }

    /// What a blocked address may still do (default: nothing).
    #[must_use]
    pub fn blocked_clients(mut self, blocked: BlockedClients) -> Self {
        self.blocked = blocked;
        self
    }

    /// How many addresses are tracked at once (default 100,000); the least recently seen
    /// are forgotten first, so memory stays bounded under a spray of addresses.
    #[must_use]
    pub fn tracked_addresses(mut self, capacity: u64) -> Self {
        self.capacity = capacity.max(1);
        self
    }
}

/// One address's failures in its current window.
struct Window {
    started: i64,
    failures: AtomicU32,
}

/// The runtime state: windows per address, and the latest instant any address is blocked
/// until, so the common case (nobody blocked) costs one atomic load.
///
/// Instants are nanoseconds of the clock's monotonic reading since `origin`: a wall clock
/// stepped back must not stretch a block, nor one stepped forward lift it.
pub(crate) struct FailureTracker {
    pub(crate) config: FailedAttemptLimit,
    clock: Arc<dyn Clock>,
    origin: std::time::Instant,
    windows: moka::sync::Cache<IpAddr, Arc<Window>>,
    blocked_until_max: AtomicI64,
    /// A request without an address was seen and logged (once per layer).
    warned_no_address: AtomicBool,
}

/// A client address over its budget.
pub(crate) struct Blocked {
    pub(crate) status: RateLimitStatus,
    pub(crate) retry_after: Duration,
    pub(crate) allow_cached: bool,
}

fn duration_nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl FailureTracker {
    pub(crate) fn new(config: FailedAttemptLimit, clock: Arc<dyn Clock>) -> Self {
        let windows = moka::sync::Cache::builder()
            .max_capacity(config.capacity)
            .time_to_live(config.window)
            .build();
        Self {
            config,
            origin: clock.monotonic(),
            clock,
            windows,
            blocked_until_max: AtomicI64::new(i64::MIN),
            warned_no_address: AtomicBool::new(false),
        }
    }

    /// Monotonic nanoseconds since the tracker was made.
    fn nanos(&self) -> i64 {
        let since = self
            .clock
            .monotonic()
            .saturating_duration_since(self.origin);
        i64::try_from(since.as_nanos()).unwrap_or(i64::MAX)
    }

    /// The client's address, per the configured source.
    pub(crate) fn address(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<IpAddr> {
        let address = match &self.config.address {
            Some(source) => source.address(headers, extensions),
            None => ClientAddressSource::Connection.address(headers, extensions),
        };
        if address.is_none()
            && !self.warned_no_address.load(Ordering::Relaxed)
            && !self.warned_no_address.swap(true, Ordering::Relaxed)
        {
            // Failed-attempt limiting without an address limits nothing: say so once.
            tracing::warn!(
                target: "keywarden",
                "failed-attempt limiting is on, but a request carried no client address: it is not counted. Serve axum with `into_make_service_with_connect_info::<SocketAddr>()`, insert a `ClientIp` extension (tonic, hyper), or use `ClientAddressSource::TrustedHeader` behind a proxy"
            );
        }
        address
    }

    /// Whether `ip` is over its budget now.
    pub(crate) fn check(&self, ip: IpAddr) -> Option<Blocked> {
        let now = self.nanos();
        if now >= self.blocked_until_max.load(Ordering::Acquire) {
            return None;
        }
        let window = self.windows.get(&ip)?;
        let until = window
            .started
            .saturating_add(duration_nanos(self.config.window));
        if window.failures.load(Ordering::Acquire) < self.config.max_failures.get() || now >= until
        {
            return None;
        }
        let retry_after = Duration::from_nanos(u64::try_from(until - now).unwrap_or(0));
        Some(Blocked {
            status: RateLimitStatus {
                limit: self.config.max_failures.get(),
                remaining: 0,
                reset: retry_after,
            },
            retry_after,
            allow_cached: self.config.blocked == BlockedClients::AllowCachedKeys,
        })
    }

    /// Counts one rejected key from `ip`.
    pub(crate) fn record_failure(&self, ip: IpAddr) {
        let now = self.nanos();
        let window_len = duration_nanos(self.config.window);
        let fresh = || {
            Arc::new(Window {
                started: now,
                failures: AtomicU32::new(0),
            })
        };
        let mut window = self.windows.get_with(ip, fresh);
        if now >= window.started.saturating_add(window_len) {
            // The old window is over (by the injectable clock): start a new one.
            window = fresh();
            self.windows.insert(ip, window.clone());
        }
        let failures = window
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if failures >= self.config.max_failures.get() {
            let until = window.started.saturating_add(window_len);
            self.blocked_until_max.fetch_max(until, Ordering::AcqRel);
            if failures == self.config.max_failures.get() {
                tracing::warn!(
                    target: "keywarden",
                    client = %ip,
                    failures,
                    "client address blocked after repeated rejected keys"
                );
            }
        }
    }
}

impl std::fmt::Debug for FailureTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureTracker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn connection_address(extensions: &Extensions) -> Option<IpAddr> {
    if let Some(ClientIp(ip)) = extensions.get::<ClientIp>() {
        return Some(canonical(*ip));
    }
    #[cfg(feature = "manage-api")]
    if let Some(info) = extensions.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(canonical(info.0.ip()));
    }
    extensions
        .get::<SocketAddr>()
        .map(|addr| canonical(addr.ip()))
}

/// The last entry of a comma-separated address list, as an IP (an optional port or IPv6
/// brackets are accepted).
fn last_address(value: &[u8]) -> Option<IpAddr> {
    parse_address(value.rsplit(|&b| b == b',').next()?)
}

/// One entry of an address list: an IP, optionally with a port (IPv6 then in brackets).
fn parse_address(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    let ip = match text.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => text.parse::<SocketAddr>().ok()?.ip(),
    };
    Some(canonical(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(networks: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            HeaderName::from_static("x-forwarded-for"),
            networks.iter().map(|n| n.parse::<IpNetwork>().unwrap()),
        )
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", value.parse().unwrap());
        }
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn trusted_proxies_believe_the_header_only_from_a_proxy() {
        let p = proxies(&["10.0.0.0/8", "::1"]);
        let headers = forwarded(&["203.0.113.7"]);
        // From a proxy: the forwarded client.
        assert_eq!(p.client(&headers, ip("10.1.1.1")), ip("203.0.113.7"));
        assert_eq!(p.client(&headers, ip("::1")), ip("203.0.113.7"));
        assert_eq!(p.client(&headers, ip("::ffff:10.1.1.1")), ip("203.0.113.7"));
        // From anyone else: that address, whatever it claims.
        assert_eq!(p.client(&headers, ip("198.51.100.2")), ip("198.51.100.2"));
        // A proxy that forwarded nothing is the address we know, or nobody.
        assert_eq!(p.client(&HeaderMap::new(), ip("10.1.1.1")), ip("10.1.1.1"));
        assert_eq!(p.forwarded_client(&HeaderMap::new(), ip("10.1.1.1")), None);
        assert_eq!(
            p.forwarded_client(&forwarded(&["garbage"]), ip("10.1.1.1")),
            None
        );
        // A client inside the trusted networks is still someone.
        assert_eq!(
            p.forwarded_client(&forwarded(&["10.9.9.9"]), ip("10.1.1.1")),
            Some(ip("10.9.9.9"))
        );
        assert_eq!(
            p.forwarded_client(&headers, ip("198.51.100.2")),
            Some(ip("198.51.100.2"))
        );
    }

    #[test]
    fn trusted_proxies_skip_proxy_hops_from_the_right() {
        let p = proxies(&["10.0.0.0/8"]);
        // The client spoofed an entry; the proxies appended the real one and their own hops.
        let headers = forwarded(&["1.2.3.4, 203.0.113.7, 10.0.0.2", "10.0.0.3"]);
        assert_eq!(p.client(&headers, ip("10.0.0.4")), ip("203.0.113.7"));
        // Every entry a proxy: the leftmost.
        let headers = forwarded(&["10.0.0.9, 10.0.0.2"]);
        assert_eq!(p.client(&headers, ip("10.0.0.4")), ip("10.0.0.9"));
        // Garbage in the next hop: nothing left of it is believed.
        let headers = forwarded(&["203.0.113.7, unknown, 10.0.0.2"]);
        assert_eq!(p.client(&headers, ip("10.0.0.4")), ip("10.0.0.2"));
        let headers = forwarded(&["garbage"]);
        assert_eq!(p.client(&headers, ip("10.0.0.4")), ip("10.0.0.4"));
        // Ports and brackets, mapped addresses.
        let headers = forwarded(&["[2001:db8::1]:4711, 10.0.0.2:80"]);
        assert_eq!(p.client(&headers, ip("10.0.0.4")), ip("2001:db8::1"));
        let headers = forwarded(&["::ffff:203.0.113.7"]);
        assert_eq!(p.client(&headers, ip("10.0.0.4")), ip("203.0.113.7"));
    }

    #[test]
    fn an_origin_is_never_a_proxys_own_address() {
        let p = proxies(&["10.0.0.0/8"]);
        let origin = |values: &[&str], peer: &str| p.origin(&forwarded(values), ip(peer));
        assert_eq!(
            origin(&["203.0.113.7"], "10.0.0.4"),
            Some(ip("203.0.113.7"))
        );
        assert_eq!(
            origin(&["1.2.3.4, 203.0.113.7, 10.0.0.2", "10.0.0.3"], "10.0.0.4"),
            Some(ip("203.0.113.7"))
        );
        // A direct client is itself, whatever it sends.
        assert_eq!(
            origin(&["10.9.9.9"], "198.51.100.2"),
            Some(ip("198.51.100.2"))
        );
        // Where `client` falls back to a proxy's address, `origin` knows nobody: a proxy that
        // forwarded nothing (and one behind it that appended the first's address), garbage
        // where a hop should be, no header.
        for (values, why) in [
            (&["10.0.0.1"][..], "only proxies"),
            (&["unknown, 10.0.0.1"], "garbage, then a proxy"),
            (
                &["203.0.113.7, unknown, 10.0.0.2"],
                "garbage in the next hop",
            ),
            (&["garbage"], "garbage"),
            (&[], "no header"),
        ] {
            assert_eq!(origin(values, "10.0.0.4"), None, "{why}");
        }
        let source = ClientAddressSource::TrustedProxies(p.clone());
        let mut extensions = Extensions::new();
        extensions.insert(ClientIp(ip("10.0.0.4")));
        assert_eq!(
            source.address(&forwarded(&["10.0.0.1"]), &extensions),
            Some(ip("10.0.0.1"))
        );
        assert_eq!(
            source.origin_address(&forwarded(&["10.0.0.1"]), &extensions),
            None
        );
        // A trusted header: only the header, never the connection behind it.
        let header = ClientAddressSource::TrustedHeader(HeaderName::from_static("x-forwarded-for"));
        assert_eq!(header.origin_address(&HeaderMap::new(), &extensions), None);
        assert_eq!(
            header.origin_address(&forwarded(&["203.0.113.7"]), &extensions),
            Some(ip("203.0.113.7"))
        );
        assert_eq!(
            ClientAddressSource::Connection
                .origin_address(&forwarded(&["203.0.113.7"]), &extensions),
            Some(ip("10.0.0.4"))
        );
    }

    #[test]
    fn trusted_proxies_need_the_connection() {
        let source = ClientAddressSource::TrustedProxies(proxies(&["10.0.0.0/8"]));
        let headers = forwarded(&["203.0.113.7"]);
        assert_eq!(source.address(&headers, &Extensions::new()), None);
        assert_eq!(source.forwarded_address(&headers), None);
        let mut extensions = Extensions::new();
        extensions.insert(ClientIp(ip("10.0.0.1")));
        assert_eq!(
            source.address(&headers, &extensions),
            Some(ip("203.0.113.7"))
        );
        let mut extensions = Extensions::new();
        extensions.insert(ClientIp(ip("192.0.2.50")));
        assert_eq!(
            source.address(&headers, &extensions),
            Some(ip("192.0.2.50"))
        );
    }
    use crate::clock::{Clock, ManualClock};
    use time::OffsetDateTime;

    fn tracker(n: u32) -> (FailureTracker, ManualClock) {
        let clock = ManualClock::new(OffsetDateTime::UNIX_EPOCH + time::Duration::days(9));
        let config = FailedAttemptLimit::new(n, Duration::from_secs(60));
        (FailureTracker::new(config, Arc::new(clock.clone())), clock)
    }

    #[test]
    fn blocks_after_n_failures_until_the_window_ends() {
        let (t, clock) = tracker(3);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        for _ in 0..2 {
            t.record_failure(ip);
            assert!(t.check(ip).is_none());
        }
        t.record_failure(ip);
        let blocked = t.check(ip).expect("blocked after the third failure");
        assert_eq!(blocked.retry_after, Duration::from_secs(60));
        assert!(t.check(other).is_none());
        clock.advance(time::Duration::seconds(59));
        assert_eq!(t.check(ip).unwrap().retry_after, Duration::from_secs(1));
        clock.advance(time::Duration::seconds(1));
        assert!(t.check(ip).is_none());
        // A new window starts from zero.
        t.record_failure(ip);
        assert!(t.check(ip).is_none());
    }

    #[test]
    fn stepping_the_wall_clock_neither_stretches_nor_lifts_a_block() {
        let (t, clock) = tracker(2);
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        t.record_failure(ip);
        // Stepped back an hour between two failures: still one window, no hour-long block.
        clock.advance(time::Duration::hours(-1));
        t.record_failure(ip);
        assert_eq!(t.check(ip).unwrap().retry_after, Duration::from_secs(60));
        // Stepped forward a day: the block still lasts its window.
        clock.set(clock.now() + time::Duration::days(1));
        assert_eq!(t.check(ip).unwrap().retry_after, Duration::from_secs(60));
        clock.advance(time::Duration::seconds(60));
        assert!(t.check(ip).is_none());
    }

    #[test]
    fn header_takes_the_last_entry() {
        let ip = |s: &str| last_address(s.as_bytes());
        assert_eq!(ip("203.0.113.1, 10.0.0.2"), "10.0.0.2".parse().ok());
        assert_eq!(ip("2001:db8::1"), "2001:db8::1".parse().ok());
        assert_eq!(ip("[2001:db8::1]:443"), "2001:db8::1".parse().ok());
        assert_eq!(ip("10.0.0.2:8080"), "10.0.0.2".parse().ok());
        assert_eq!(ip("10.0.0.2, garbage"), None);
        assert_eq!(ip(""), None);
        assert_eq!(last_address(b"\xff\xfe"), None);
    }

    #[test]
    fn address_sources() {
        let (t, _) = tracker(1);
        let mut ext = Extensions::new();
        let headers = HeaderMap::new();
        assert_eq!(t.address(&headers, &ext), None);
        ext.insert("198.51.100.4:5000".parse::<SocketAddr>().unwrap());
        assert_eq!(t.address(&headers, &ext), "198.51.100.4".parse().ok());
        ext.insert(ClientIp("198.51.100.5".parse().unwrap()));
        assert_eq!(t.address(&headers, &ext), "198.51.100.5".parse().ok());

        let config = FailedAttemptLimit::new(1, Duration::from_secs(1)).client_address(
            ClientAddressSource::TrustedHeader(HeaderName::from_static("x-real-ip")),
        );
        let t = FailureTracker::new(config, Arc::new(crate::clock::SystemClock));
        let mut headers = HeaderMap::new();
        headers.insert("x-real-ip", "203.0.113.9".parse().unwrap());
        assert_eq!(t.address(&headers, &ext), "203.0.113.9".parse().ok());
        headers.insert("x-real-ip", "nonsense".parse().unwrap());
        assert_eq!(t.address(&headers, &ext), "198.51.100.5".parse().ok());
    }
}
