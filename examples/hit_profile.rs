//! A driver for profiling the hit path under callgrind: a layer over a memory store with
//! 10,000 cached keys, called through `oneshot` N times with a key chosen at random.
//!
//! ```text
//! cargo build --release --example hit_profile
//! valgrind --tool=callgrind --toggle-collect='hit_profile::hits*' \
//!     target/release/examples/hit_profile 20000
//! ```
//!
//! Only `hits` is measured (with `--toggle-collect`), so set-up and warm-up are excluded.
//! `HIT_PROFILE_USAGE=off` turns usage recording off, to attribute its cost.
//! `HIT_PROFILE_MODE=malformed` sends keys with a broken checksum instead (each rejected with
//! 401 `malformed_key`, no store query), to measure the rejection path.
//! `HIT_PROFILE_METRICS=on` (feature `metrics`) builds the layer with a Prometheus recorder
//! (`metrics-exporter-prometheus`, not installed globally), to measure metrics on; otherwise
//! no recorder is installed and the layer's handles are no-ops.
//! `HIT_PROFILE_ALLOWLIST=on` gives every key an IP allowlist holding `127.0.0.0/8` and every
//! request a `ClientIp(127.0.0.1)` extension (the allowlist is checked and passes);
//! `HIT_PROFILE_CLIENT_IP=on` adds the extension alone (keys without allowlists), to separate
//! the driver's extension insert from the check. `HIT_PROFILE_OWNER=on` gives the collection
//! an owner budget too high ever to refuse (`Collection::owner_rate_limit`, 1,000,000,000/s;
//! each key has its own owner, so 10,000 budgets). `HIT_PROFILE_CREDITS=on` gives every key
//! credits (10^12, never run out): each hit spends one from the key's lease (the warm-up took
//! one lease of the default block per key, which the measured hits do not use up; the layer
//! is built outside the runtime, so no idle sweep gives leases back) and gets
//! `Credits-Remaining`. `HIT_PROFILE_OWNER_CREDITS=on` gives every key's owner a stored policy
//! with shared credits (10^12) instead: each hit spends one from the owner's account.
//! `HIT_PROFILE_HEADERS=N` (0 to 16) puts N other headers before the key (`host`,
//! `user-agent`, `accept`, … as browsers and proxies send them), to see how the credential's
//! search scales with the request's headers.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::Empty;
use keywarden::net::IpNetwork;
use keywarden::ratelimit::{ClientIp, RateLimitPolicy};
use keywarden::{ApiKeyLayer, Collection, KeyManager, MemoryStore, NewKey, SecretRing};
use tower::{Layer, Service, ServiceExt};

#[path = "support/driver.rs"]
mod driver;

const KEYS: usize = 10_000;

fn noop() -> impl Service<
    Request<()>,
    Response = Response<Empty<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Empty::new()))
    })
}

/// Headers a request may carry besides the key, in the order browsers and proxies send them.
const OTHER_HEADERS: [(&str, &str); 16] = [
    ("host", "api.example.com"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64)"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip, br"),
    ("accept-language", "en-GB,en;q=0.9"),
    ("content-type", "application/json"),
    ("x-request-id", "0190f2c4-6b7e-7d3a-9c1e-1f2a3b4c5d6e"),
    (
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
    ("x-forwarded-for", "203.0.113.7"),
    ("x-forwarded-proto", "https"),
    ("cookie", "session=abc"),
    ("referer", "https://app.example.com/"),
    ("origin", "https://app.example.com"),
    ("connection", "keep-alive"),
    ("cache-control", "no-cache"),
    ("sec-fetch-mode", "cors"),
];

fn request(value: &HeaderValue, client: Option<IpAddr>, others: usize) -> Request<()> {
    let mut req = Request::new(());
    for (name, value) in &OTHER_HEADERS[..others] {
        req.headers_mut()
            .append(*name, HeaderValue::from_static(value));
    }
    req.headers_mut().insert("x-api-key", value.clone());
    if let Some(ip) = client {
        req.extensions_mut().insert(ClientIp(ip));
    }
    req
}

fn on(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "on")
}

/// The measured loop: `n` hits on keys chosen by an LCG walk. A plain function (not an
/// `async fn`, whose body would be inlined into the executor) so callgrind can toggle on it.
#[inline(never)]
fn hits<S, B>(
    runtime: &tokio::runtime::Runtime,
    service: &S,
    keys: &[HeaderValue],
    client: Option<IpAddr>,
    others: usize,
    n: usize,
) -> usize
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
{
    runtime.block_on(async {
        let mut ok = 0;
        let mut walk = driver::KeyWalk::new(keys.len());
        for _ in 0..n {
            let req = request(&keys[walk.next_index()], client, others);
            let response = service.clone().oneshot(req).await.unwrap();
            ok += usize::from(response.status() == 200);
        }
        black_box(ok)
    })
}

fn main() {
    let n = driver::count_arg(20_000);
    let usage = std::env::var("HIT_PROFILE_USAGE").map_or(true, |v| v != "off");
    let others = std::env::var("HIT_PROFILE_HEADERS")
        .map_or(0, |v| v.parse::<usize>().expect("a number of headers"))
        .min(OTHER_HEADERS.len());
    let allowlist = on("HIT_PROFILE_ALLOWLIST");
    let owner = on("HIT_PROFILE_OWNER");
    let credits = on("HIT_PROFILE_CREDITS");
    let owner_credits = on("HIT_PROFILE_OWNER_CREDITS");
    let client =
        (allowlist || on("HIT_PROFILE_CLIENT_IP")).then_some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let collection = if owner {
        Collection::new("users")
            .owner_rate_limit("1000000000/s".parse::<RateLimitPolicy>().unwrap())
    } else {
        Collection::new("users")
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let build = || {
        ApiKeyLayer::builder()
            .store(Arc::new(MemoryStore::new()))
            .secrets(
                SecretRing::from_strs("profile-secret-0123456789-abcdefghijklmn", None).unwrap(),
            )
            .collection(collection.clone())
            .usage_flush_interval(usage.then_some(std::time::Duration::from_secs(3600)))
            .build()
            .unwrap()
    };
    let metered = std::env::var("HIT_PROFILE_METRICS").is_ok_and(|m| m == "on");
    #[cfg(feature = "metrics")]
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    #[cfg(feature = "metrics")]
    let layer = if metered {
        metrics::with_local_recorder(&recorder, build)
    } else {
        build()
    };
    #[cfg(not(feature = "metrics"))]
    let layer = {
        assert!(
            !metered,
            "HIT_PROFILE_METRICS=on needs the `metrics` feature"
        );
        build()
    };
    let manager = KeyManager::for_layer(&layer);
    let keys: Vec<HeaderValue> = runtime.block_on(async {
        let mut keys = Vec::with_capacity(KEYS);
        for i in 0..KEYS {
            let mut new = NewKey::new(format!("k{i}"), format!("u{i}"));
            if allowlist {
                new = new.allow_ip("127.0.0.0/8".parse::<IpNetwork>().unwrap());
            }
            if credits {
                new = new.credits(1_000_000_000_000);
            }
            let created = manager.create(new).await.unwrap();
            if owner_credits {
                let shared =
                    keywarden::store::OwnerPolicyUpdate::default().credits(Some(1_000_000_000_000));
                manager
                    .set_owner_policy("users", &format!("u{i}"), shared)
                    .await
                    .unwrap();
            }
            keys.push(HeaderValue::from_str(created.key.expose()).unwrap());
        }
        keys
    });
    let service = layer.layer(noop());
    runtime.block_on(async {
        // Warm: every key cached, usage entries present.
        for key in &keys {
            let response = service
                .clone()
                .oneshot(request(key, client, others))
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    });
    if std::env::var("HIT_PROFILE_MODE").is_ok_and(|m| m == "malformed") {
        // The same keys with the last character changed: right prefix, length and alphabet,
        // wrong checksum.
        let malformed: Vec<HeaderValue> = keys
            .iter()
            .map(|key| {
                let mut bytes = key.as_bytes().to_vec();
                let last = bytes.last_mut().unwrap();
                *last = if *last == b'A' { b'B' } else { b'A' };
                HeaderValue::from_bytes(&bytes).unwrap()
            })
            .collect();
        let ok = hits(&runtime, &service, &malformed, client, others, n);
        assert_eq!(ok, 0, "every malformed key is rejected");
        println!("{n} malformed keys rejected");
        return;
    }
    let ok = hits(&runtime, &service, &keys, client, others, n);
    assert_eq!(ok, n);
    let word = |b: bool| if b { "on" } else { "off" };
    println!(
        "{n} hits over {KEYS} cached keys (usage {}, metrics {}, allowlist {}, client ip {}, owner budget {}, credits {}, owner credits {})",
        word(usage),
        word(metered),
        word(allowlist),
        word(client.is_some()),
        word(owner),
        word(credits),
        word(owner_credits)
    );
}
