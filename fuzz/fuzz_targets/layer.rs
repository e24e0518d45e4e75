//! The whole layer, driven with arbitrary methods, paths and headers against a memory store
//! holding real keys in every state.
//!
//! Input: first line `<A|B> <method> <path>`, then `name: value` header lines; `{k0}`..`{k9}`
//! expand to the fixture keys below. Layer A is required mode with a query parameter and an
//! extra key header; layer B is optional mode and strips credentials.
//!
//! Invariants:
//! - the response is the inner service's 200 or a documented rejection (DESIGN §4): status,
//!   problem+json body with a documented code, or a trailers-only gRPC response for gRPC;
//! - the inner service only ever sees a principal of an active key whose plaintext was in the
//!   request, never of a revoked, disabled, expired, deleted or unknown key; a read-only key
//!   only on safe methods; in required mode there always is a principal;
//! - credential headers reach the inner service marked sensitive (A) or not at all (B);
//! - no response carries any fixture key;
//! - a request whose only credential is `X-Api-Key: {kN}` gets exactly the outcome of key N.
#![no_main]

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use http::{HeaderMap, Method, Request, Response, Uri};
use keywarden::{
    ApiKeyLayer, layer::AuthBody, Collection, ExpiresIn, KeyManager, store::KeyPatch, KeyStore, clock::ManualClock,
    MemoryStore, NewKey, Principal, SecretRing};
use keywarden_fuzz::{check_problem, contains, headers, layer_status, split_lines, CODES};
use libfuzzer_sys::fuzz_target;
use tower::{Layer, ServiceExt};
use uuid::Uuid;

const SECRET: &str = "fuzz-current-secret-0123456789abcdefghij";
const OLD_SECRET: &str = "fuzz-previous-secret-0123456789abcdefghi";
const OPAQUE: &str = "partner-token-0001";

/// What each fixture key should get, alone in `X-Api-Key`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Ok,
    ReadOnly,
    Code(&'static str),
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    required: ApiKeyLayer,
    optional: ApiKeyLayer,
    keys: Vec<String>,
    ids: Vec<Option<Uuid>>,
    expect: Vec<Expect>,
}

/// What the inner service saw, passed back in the response extensions.
#[derive(Clone)]
struct Seen {
    principal: Option<Principal>,
    headers: HeaderMap,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (required, optional, keys, ids, expect) = runtime.block_on(setup());
        Fixture {
            runtime,
            required,
            optional,
            keys,
            ids,
            expect,
        }
    })
}

async fn setup() -> (
    ApiKeyLayer,
    ApiKeyLayer,
    Vec<String>,
    Vec<Option<Uuid>>,
    Vec<Expect>,
) {
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(time::OffsetDateTime::now_utc());
    let ring = SecretRing::from_strs(SECRET, Some(OLD_SECRET)).unwrap();
    let builder = || {
        ApiKeyLayer::builder()
            .store(store.clone())
            .secrets(ring.clone())
            .clock(Arc::new(clock.clone()))
            .collection(Collection::new("users"))
            .collection(Collection::new("teams"))
            .collection(Collection::new("services"))
            .collection(Collection::opaque("partners"))
    };
    let required = builder()
        .header("x-stack-api-key")
        .query_param("api_key")
        .build()
        .unwrap();
    let optional = builder()
        .optional()
        .strip_credentials(true)
        .build()
        .unwrap();
    let manager = KeyManager::for_layer(&required)
        .invalidates(&optional)
        .with_clock(Arc::new(clock.clone()));
    let old_manager = KeyManager::new(
        store.clone(),
        SecretRing::from_strs(OLD_SECRET, None).unwrap(),
    )
    .with_clock(Arc::new(clock.clone()));

    let mut keys = Vec::new();
    let mut ids = Vec::new();
    let mut expect = Vec::new();
    let mut add = |key: String, id: Option<Uuid>, e: Expect| {
        keys.push(key);
        ids.push(id);
        expect.push(e);
    };
    let create = |new: NewKey| async { manager.create(new).await.unwrap() };

    let k = create(NewKey::new("plain", "alice")).await;
    add(k.key.expose().into(), Some(k.record.id), Expect::Ok);
    let k = create(
        NewKey::new("admin", "team-1")
            .collection("teams")
            .scope("admin"),
    )
    .await;
    add(k.key.expose().into(), Some(k.record.id), Expect::Ok);
    let k = create(NewKey::new("reader", "bob").read_only(true)).await;
    add(k.key.expose().into(), Some(k.record.id), Expect::ReadOnly);
    let k = create(NewKey::new("revoked", "carol")).await;
    manager.revoke(k.record.id).await.unwrap();
    add(k.key.expose().into(), None, Expect::Code("revoked_key"));
    let k = create(NewKey::new("expiring", "dave").expires_in(ExpiresIn::DAYS_7)).await;
    add(k.key.expose().into(), None, Expect::Code("expired_key"));
    let k = create(NewKey::new("disabled", "erin")).await;
    let patch = KeyPatch {
        disabled: Some(true),
        ..KeyPatch::default()
    };
    manager.update(k.record.id, patch).await.unwrap();
    add(k.key.expose().into(), None, Expect::Code("revoked_key"));
    // Made under the previous secret: its first use migrates it.
    let k = old_manager
        .create(
            NewKey::new("old-secret", "svc")
                .collection("services")
                .environment("test"),
        )
        .await
        .unwrap();
    add(k.key.expose().into(), Some(k.record.id), Expect::Ok);
    // An imported foreign key of the opaque collection.
    let mut record = create(NewKey::new("partner", "p1").collection("partners"))
        .await
        .record;
    store.delete(record.id).await.unwrap();
    record.digest = ring.digest(OPAQUE.as_bytes());
    store.insert(&record).await.unwrap();
    add(OPAQUE.into(), Some(record.id), Expect::Ok);
    // Well-formed, never stored.
    let unknown = keywarden::key::KeyPrefix::new("kw_live").unwrap().generate();
    add(unknown.expose().into(), None, Expect::Code("invalid_key"));
    let k = create(NewKey::new("deleted", "frank")).await;
    manager.delete(k.record.id).await.unwrap();
    add(k.key.expose().into(), None, Expect::Code("invalid_key"));

    clock.advance(time::Duration::days(8));
    (required, optional, keys, ids, expect)
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let (first, lines) = split_lines(data);
    let mut words = first.splitn(3, |&b| b == b' ');
    let use_optional = words.next() == Some(b"B");
    let method = words
        .next()
        .and_then(|m| Method::from_bytes(m).ok())
        .unwrap_or(Method::GET);
    let uri = words
        .next()
        .and_then(|p| Uri::try_from(p).ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    let map = headers(&lines, &fx.keys);

    let mut request = Request::builder()
        .method(method.clone())
        .uri(uri.clone())
        .body(())
        .unwrap();
    *request.headers_mut() = map.clone();
    let layer = if use_optional {
        &fx.optional
    } else {
        &fx.required
    };
    let inner = tower::service_fn(|req: Request<()>| async move {
        let seen = Seen {
            principal: req.extensions().get::<Principal>().cloned(),
            headers: req.headers().clone(),
        };
        let mut response = Response::new(String::from("inner"));
        response.extensions_mut().insert(seen);
        Ok::<_, Infallible>(response)
    });
    let response: Response<AuthBody<String>> = fx
        .runtime
        .block_on(layer.layer(inner).oneshot(request))
        .unwrap();

    let grpc = map
        .get("content-type")
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"));
    let key_headers = ["authorization", "x-api-key", "x-stack-api-key"];
    let code: Option<String> = match response.extensions().get::<Seen>() {
        Some(seen) => {
            assert_eq!(response.status(), 200);
            assert!(response.body().rejection_bytes().is_none());
            match &seen.principal {
                Some(principal) => {
                    let index = fx
                        .ids
                        .iter()
                        .position(|id| *id == Some(principal.key_id()))
                        .unwrap_or_else(|| panic!("principal of an inactive key reached inner"));
                    let key = fx.keys[index].as_bytes();
                    let in_request = map.values().any(|v| contains(v.as_bytes(), key))
                        || contains(uri.to_string().as_bytes(), key);
                    assert!(in_request, "the principal's key was not in the request");
                    if fx.expect[index] == Expect::ReadOnly {
                        assert!(method.is_safe(), "read-only key on {method}");
                    }
                    if use_optional {
                        assert!(!seen.headers.contains_key("x-api-key"), "not stripped");
                    } else {
                        for name in ["x-api-key", "x-stack-api-key"] {
                            if let Some(value) = seen.headers.get(name) {
                                assert!(value.is_sensitive(), "{name} not marked sensitive");
                            }
                        }
                        if let Some(value) = seen.headers.get("authorization") {
                            let bytes = keywarden_fuzz::trim_ows(value.as_bytes());
                            let bearer =
                                bytes.len() > 7 && bytes[..7].eq_ignore_ascii_case(b"bearer ");
                            if bearer && contains(bytes, key) {
                                assert!(value.is_sensitive(), "Authorization not sensitive");
                            }
                        }
                    }
                }
                None => assert!(
                    use_optional,
                    "required mode let a request through anonymously"
                ),
            }
            None
        }
        None if grpc => {
            assert_eq!(response.status(), 200, "gRPC rejections are trailers-only");
            let status = response.headers()["grpc-status"].to_str().unwrap();
            let message = response.headers()["grpc-message"].to_str().unwrap();
            assert!(
                CODES.iter().any(|(c, _, g)| *c == message && *g == status),
                "{status} {message}"
            );
            assert_eq!(response.body().rejection_bytes(), Some(&b""[..]));
            Some(message.to_owned())
        }
        None => {
            let body = response.body().rejection_bytes().expect("a rejection body");
            let code = check_problem(
                response.status().as_u16(),
                response.headers().get("content-type"),
                body,
            );
            assert_eq!(
                layer_status(&code),
                Some(response.status().as_u16()),
                "{code}"
            );
            if response.status() == 401 {
                assert!(response.headers().contains_key("www-authenticate"));
            }
            if code == "rate_limited" {
                assert!(response.headers().contains_key("retry-after"));
            }
            Some(code)
        }
    };

    // No fixture key in any response.
    let body = response.body().rejection_bytes().unwrap_or_default();
    for key in &fx.keys {
        assert!(
            !contains(body, key.as_bytes()),
            "a key in the response body"
        );
        for value in response.headers().values() {
            assert!(
                !contains(value.as_bytes(), key.as_bytes()),
                "a key in a response header"
            );
        }
    }

    // The exact outcome when the only credential is `X-Api-Key: <fixture key>`.
    let sources: usize = key_headers
        .iter()
        .map(|n| map.get_all(*n).iter().count())
        .sum();
    let query_key = uri.query().is_some_and(|q| q.contains("api_key"));
    if sources == 1 && !query_key && code.as_deref() != Some("rate_limited") {
        if let Some(value) = map.get("x-api-key") {
            let value = keywarden_fuzz::trim_ows(value.as_bytes());
            if let Some(index) = fx.keys.iter().position(|k| k.as_bytes() == value) {
                let got = code.as_deref();
                // A rate limit may stop any request; it is checked above as a documented code.
                match fx.expect[index] {
                    Expect::Ok => assert_eq!(got, None, "key {index}"),
                    Expect::ReadOnly if method.is_safe() => assert_eq!(got, None),
                    Expect::ReadOnly => assert_eq!(got, Some("insufficient_scope")),
                    Expect::Code(expected) => assert_eq!(got, Some(expected), "key {index}"),
                }
            }
        }
    }
});
