//! JSON bodies (and methods, paths, content types) of the management API, behind the layer,
//! called by an admin (`keys:admin`) or a self-service (`keys:self`) key.
//!
//! Input: first line `<a|s> <METHOD> <path>` (`a`: admin caller, `s`: self caller; in the
//! path `{victim}`, `{other}` and `{self}` expand to key ids: a key of the self caller's
//! owner, a key of another owner, the self caller's own key), then header lines, an empty
//! line, and the body. The harness sends the caller's key itself.
//!
//! Invariants:
//! - the status is one the management API documents (never 500); every error is
//!   problem+json with a code and a matching status field;
//! - no error repeats submitted text: a body holding `CANARY` never gets it back;
//! - no response carries an existing key's plaintext; a 201 carries a new, well-formed key
//!   with `Cache-Control: no-store`; no view shows a digest, secret id or encrypted key;
//! - a `keys:self` caller never sees or makes anything beyond its own powers: listings and
//!   views are its own keys, `{other}` is a 404, and created or rotated keys keep its
//!   collection, subject and environment, scopes within its own and expiry no later.
#![no_main]

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::Router;
use http::{Method, Request};
use http_body_util::BodyExt;
use keywarden::{
    management_router, ApiKeyLayer, Collection, ExpiresIn, key::KeyFormat, KeyManager, MemoryStore,
    NewKey, SecretRing};
use keywarden_fuzz::{contains, headers};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tower::ServiceExt;

const SECRET: &str = "fuzz-manage-secret-0123456789abcdefghijk";
const SELF_SCOPES: [&str; 2] = ["keys:self", "read"];
const DOCUMENTED: [u16; 13] = [
    200, 201, 204, 400, 401, 403, 404, 405, 409, 413, 415, 422, 503,
];

struct State {
    app: Router,
    admin_key: String,
    self_key: String,
    self_id: String,
    self_expires: OffsetDateTime,
    victim_id: String,
    other_id: String,
    plaintexts: Vec<String>,
}

async fn setup() -> State {
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(MemoryStore::new()))
        .secrets(SecretRing::from_strs(SECRET, None).unwrap())
        .collection(Collection::new("users"))
        .collection(Collection::new("teams"))
        .usage_flush_interval(None)
        .build()
        .unwrap();
    let manager = Arc::new(KeyManager::for_layer(&layer));
    let admin = manager
        .create(NewKey::new("admin", "root").scope("keys:admin"))
        .await
        .unwrap();
    let mut new_self = NewKey::new("self", "alice")
        .expires_in(ExpiresIn::DAYS_30)
        .rate_limit("100/min".parse().unwrap());
    for scope in SELF_SCOPES {
        new_self = new_self.scope(scope);
    }
    let caller = manager.create(new_self).await.unwrap();
    let victim = manager
        .create(
            NewKey::new("victim", "alice")
                .scope("read")
                .expires_in(ExpiresIn::DAYS_7),
        )
        .await
        .unwrap();
    let other = manager
        .create(NewKey::new("other", "mallory").scope("keys:admin"))
        .await
        .unwrap();
    let app = Router::new()
        .nest("/admin", management_router(manager))
        .layer(layer);
    State {
        app,
        admin_key: admin.key.expose().into(),
        self_key: caller.key.expose().into(),
        self_id: caller.record.id.to_string(),
        self_expires: caller.record.expires_at.unwrap(),
        victim_id: victim.record.id.to_string(),
        other_id: other.record.id.to_string(),
        plaintexts: [&admin, &caller, &victim, &other]
            .iter()
            .map(|k| k.key.expose().to_owned())
            .collect(),
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn replace_all(text: &[u8], from: &str, to: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(from.as_bytes()) {
            out.extend_from_slice(to.as_bytes());
            i += from.len();
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

fn view_is_clean(view: &Value) {
    for field in ["digest", "secret_id", "encrypted_key"] {
        assert!(view.get(field).is_none(), "a view shows {field}");
    }
}

/// A view the self caller may see: one of its owner's keys.
fn own(view: &Value) {
    assert_eq!(
        view["collection"], "users",
        "self caller saw another collection"
    );
    assert_eq!(
        view["subject"], "alice",
        "self caller saw another owner's key"
    );
}

fn run(state: &State, data: &[u8]) -> bool {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &b""[..]),
    };
    let mut lines = head.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let mut words = first.splitn(3, |&b| b == b' ');
    let as_self = words.next() == Some(b"s");
    let method = words
        .next()
        .and_then(|m| Method::from_bytes(m).ok())
        .unwrap_or(Method::GET);
    let path = words.next().unwrap_or(b"/admin/keys");
    let path = replace_all(path, "{victim}", &state.victim_id);
    let path = replace_all(&path, "{other}", &state.other_id);
    let path = replace_all(&path, "{self}", &state.self_id);
    let Ok(uri) = http::Uri::try_from(path) else {
        return false;
    };
    let header_lines: Vec<&[u8]> = lines.collect();
    let mut map = headers(&header_lines, &[]);
    map.remove("authorization");
    map.remove("x-api-key");
    let caller = if as_self {
        &state.self_key
    } else {
        &state.admin_key
    };
    map.insert("x-api-key", caller.parse().unwrap());

    let mut request = Request::builder()
        .method(method.clone())
        .uri(uri)
        .body(Body::from(body.to_vec()))
        .unwrap();
    *request.headers_mut() = map;
    let (status, response_headers, bytes) = runtime().block_on(async {
        let response = state.app.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes(),
        )
    });
    let status_code = status.as_u16();
    assert!(
        DOCUMENTED.contains(&status_code),
        "undocumented status {status}"
    );

    let is_error = status.is_client_error() || status.is_server_error();
    for plaintext in &state.plaintexts {
        // A success view may show what the caller itself submitted (a name, metadata), even a
        // pasted key; an error never repeats submitted text, and no key is ever looked up.
        let submitted = contains(data, plaintext.as_bytes());
        assert!(
            (submitted && !is_error) || !contains(&bytes, plaintext.as_bytes()),
            "a stored key in a response"
        );
    }
    let content_type = response_headers.get("content-type").map(|v| v.as_bytes());
    if status.is_client_error() || status.is_server_error() {
        assert!(
            !contains(&bytes, b"CANARY"),
            "an error echoed submitted text"
        );
        // axum's own 404 (no route) and 405 (no method) come with an empty body.
        if !bytes.is_empty() {
            assert_eq!(content_type, Some(&b"application/problem+json"[..]));
            let json: Value = serde_json::from_slice(&bytes).expect("problem+json");
            assert_eq!(json["status"], status_code);
            assert!(json["code"].as_str().is_some_and(|c| !c.is_empty()));
        } else {
            assert!(
                status_code == 404 || status_code == 405,
                "{status} with no body"
            );
        }
        return false;
    }
    let mutated = method != Method::GET && method != Method::HEAD;
    if status_code == 204 {
        return mutated;
    }
    let json: Value = serde_json::from_slice(&bytes).expect("a JSON success body");
    if let Some(items) = json.get("items").and_then(Value::as_array) {
        for view in items {
            view_is_clean(view);
            if as_self {
                own(view);
            }
        }
    } else {
        view_is_clean(&json);
        if as_self {
            own(&json);
            assert_ne!(
                json["id"],
                state.other_id.as_str(),
                "self caller reached {{other}}"
            );
        }
    }
    if status_code == 201 {
        assert_eq!(response_headers["cache-control"], "no-store");
        let key = json["key"].as_str().expect("a 201 carries the key");
        KeyFormat::default()
            .parse(key.as_bytes())
            .expect("a well-formed new key");
        if as_self {
            assert_eq!(json["environment"], "live");
            for scope in json["scopes"].as_array().unwrap() {
                assert!(SELF_SCOPES.contains(&scope.as_str().unwrap()), "{scope}");
            }
            let expires = json["expires_at"].as_str().expect("self keys expire");
            let expires = OffsetDateTime::parse(expires, &Rfc3339).unwrap();
            assert!(
                expires <= state.self_expires,
                "self caller made a longer-lived key"
            );
        }
    }
    mutated
}

fuzz_target!(|data: &[u8]| {
    STATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(runtime().block_on(setup()));
        }
        let dirty = run(slot.as_ref().unwrap(), data);
        if dirty {
            // Start the next input from the same keys.
            *slot = None;
        }
    });
});
