//! No plaintext key and no secret in logs (TRACE), `Debug` output, responses, or the store.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use keywarden::{
    CredentialExtractor, KeyPatch, KeyQuery, KeyStore, MemoryStore, NewKey, Secret, SecretRing,
};
use support::{get_with, request, send, Fixture, OLD_SECRET, SECRET};
use time::Duration;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fails if any forbidden string, or any 13-character window of it, appears in `text`.
/// (The documented display hint is the prefix plus 4 characters: 12 for `kw_live_`.)
fn assert_clean(what: &str, text: &str, forbidden: &[String]) {
    for secret in forbidden {
        let bytes = secret.as_bytes();
        for window in bytes.windows(13.min(bytes.len())) {
            let window = std::str::from_utf8(window).unwrap();
            assert!(
                !text.contains(window),
                "{what} contains a fragment of a key or secret ({window:?})"
            );
        }
    }
}

#[tokio::test]
async fn a_full_lifecycle_leaks_nothing() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let store = Arc::new(MemoryStore::new());
    let old = Fixture::with_store(
        store.clone(),
        SecretRing::from_strs(OLD_SECRET, None).unwrap(),
        |b| b,
    );
    let first = old.key(NewKey::new("first", "alice")).await;
    // Rotate the application secret: the key is re-digested on first use.
    let fx = Fixture::with_store(
        store.clone(),
        SecretRing::from_strs(SECRET, Some(OLD_SECRET)).unwrap(),
        |b| b,
    );
    let app = fx.app();
    let mut forbidden = vec![
        SECRET.to_owned(),
        OLD_SECRET.to_owned(),
        first.key.expose().to_owned(),
    ];
    let mut transcript = String::new();

    let k = first.key.expose().to_owned();
    let forms = [
        ("authorization", format!("users API-Key {k}")),
        ("authorization", format!("Bearer {k}")),
        ("x-api-key", k.clone()),
    ];
    for (name, value) in &forms {
        let reply = get_with(&app, "/whoami", &[(name, value.as_bytes())]).await;
        assert_eq!(reply.status, 200);
        transcript.push_str(&format!("\n{:?}\n{}", reply.headers, reply.text()));
    }
    // Failures of every kind, each carrying the key or a near-copy of it.
    let mut tampered = k.clone().into_bytes();
    tampered[20] = if tampered[20] == b'a' { b'b' } else { b'a' };
    let failures: Vec<Vec<(&str, Vec<u8>)>> = vec![
        vec![("x-api-key", tampered.clone())],
        vec![("authorization", format!("teams API-Key {k}").into_bytes())],
        vec![("authorization", format!("nope API-Key {k}").into_bytes())],
        vec![
            ("authorization", format!("Bearer {k}").into_bytes()),
            ("x-api-key", b"kw_live_zz".to_vec()),
        ],
        vec![("x-api-key", format!("{k} {k}").into_bytes())],
    ];
    for headers in &failures {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let reply = get_with(&app, "/whoami", &headers).await;
        assert!(reply.status.is_client_error());
        transcript.push_str(&format!("\n{:?}\n{}", reply.headers, reply.text()));
    }
    let reply = send(
        &app,
        request("GET", "/admin", &[("x-api-key", k.as_bytes())]),
    )
    .await;
    assert_eq!(reply.status, 403);
    transcript.push_str(&format!("\n{}", reply.text()));

    let rotated = fx
        .manager
        .rotate(first.record.id, Duration::hours(1))
        .await
        .unwrap();
    forbidden.push(rotated.key.expose().to_owned());
    fx.manager
        .update(
            rotated.record.id,
            KeyPatch {
                read_only: Some(true),
                ..KeyPatch::default()
            },
        )
        .await
        .unwrap();
    let reply = send(
        &app,
        request(
            "POST",
            "/write",
            &[("x-api-key", rotated.key.expose().as_bytes())],
        ),
    )
    .await;
    assert_eq!(reply.status, 403);
    transcript.push_str(&format!("\n{}", reply.text()));
    fx.manager.revoke(rotated.record.id).await.unwrap();
    let reply = get_with(
        &app,
        "/whoami",
        &[("x-api-key", rotated.key.expose().as_bytes())],
    )
    .await;
    assert_eq!(reply.code(), "revoked_key");
    transcript.push_str(&format!("\n{}", reply.text()));
    fx.clock.advance(Duration::hours(2));
    let reply = get_with(&app, "/whoami", &[("x-api-key", k.as_bytes())]).await;
    assert_eq!(reply.code(), "expired_key");
    transcript.push_str(&format!("\n{}", reply.text()));

    // Debug output of every public type that touches a key or secret.
    let headers = {
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", k.parse().unwrap());
        h
    };
    let extractor = CredentialExtractor::new(["users"]);
    let credential = extractor.extract(&headers, None).unwrap().unwrap();
    let page = store.list(&KeyQuery::new()).await.unwrap();
    let debug = format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        first,
        rotated,
        first.key,
        credential,
        fx.layer,
        fx.manager,
        fx.layer.secrets(),
        Secret::new(SECRET).unwrap(),
        page,
        store,
    );
    assert_clean("Debug output", &debug, &forbidden);
    assert_clean("responses", &transcript, &forbidden);
    // The store holds digests only.
    for record in &page.items {
        assert_clean(
            "stored record",
            &format!("{record:?}\n{}\n{}", record.display_start, record.name),
            &forbidden[2..],
        );
    }
    drop(_guard);
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("request rejected"),
        "TRACE logging was captured: {logs}"
    );
    assert!(logs.contains("re-digested key"), "{logs}");
    assert!(logs.contains("request authenticated"));
    assert_clean("logs", &logs, &forbidden);
}
