//! Metrics and tracing through a real router (`tower::ServiceExt::oneshot`): every outcome
//! counted once under its collection and code, consistent with `ApiKeyLayer::stats`; one
//! `authenticate` span per authentication with the key id, collection and outcome, never the
//! key.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use keywarden::{ExpiresIn, NewKey};
use support::*;

#[cfg(feature = "metrics")]
mod metrics_through_a_router {
    use std::collections::BTreeMap;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    #[tokio::test]
    async fn each_outcome_is_counted_once_under_its_collection() {
        let _serial = super::SERIAL.lock().await;
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let fixture = metrics::with_local_recorder(&recorder, Fixture::new);
        let app = fixture.app();
        let optional = app_optional(&fixture);
        let user = fixture
            .key(NewKey::new("u", "alice").collection("users"))
            .await;
        let read_only = fixture
            .key(NewKey::new("r", "bob").collection("teams").read_only(true))
            .await;
        let expiring = fixture
            .key(
                NewKey::new("e", "carol")
                    .collection("services")
                    .expires_in(ExpiresIn::After(time::Duration::hours(1))),
            )
            .await;
        let key = |created: &keywarden::CreatedKey| created.key.expose().as_bytes().to_vec();

        for _ in 0..3 {
            let reply = get_with(&app, "/whoami", &[("x-api-key", &key(&user))]).await;
            assert_eq!(reply.status, 200);
        }
        let reply = send(
            &app,
            request("POST", "/write", &[("x-api-key", &key(&read_only))]),
        )
        .await;
        assert_eq!(reply.code(), "insufficient_scope");
        fixture.clock.advance(time::Duration::hours(2));
        let reply = get_with(&app, "/whoami", &[("x-api-key", &key(&expiring))]).await;
        assert_eq!(reply.code(), "expired_key");
        let reply = get_with(&app, "/whoami", &[]).await;
        assert_eq!(reply.code(), "missing_credentials");
        let reply = get_with(&optional, "/maybe", &[]).await;
        assert_eq!(reply.text(), "anonymous");

        let mut values = BTreeMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            if key.name() != keywarden::metrics::REQUESTS {
                continue;
            }
            let label = |name: &str| {
                key.labels()
                    .find(|l| l.key() == name)
                    .map(|l| l.value().to_owned())
                    .unwrap()
            };
            if let DebugValue::Counter(n) = value {
                if n > 0 {
                    values.insert((label("collection"), label("outcome")), n);
                }
            }
        }
        let expected: BTreeMap<(String, String), u64> = [
            (("users", "accepted"), 3),
            (("teams", "insufficient_scope"), 1),
            (("services", "expired_key"), 1),
            (("", "missing_credentials"), 1),
            (("", "anonymous"), 1),
        ]
        .into_iter()
        .map(|((c, o), n)| ((c.to_owned(), o.to_owned()), n))
        .collect();
        assert_eq!(values, expected);
        assert_eq!(fixture.layer.stats().rate_limited, 0);
    }

    fn app_optional(fixture: &Fixture) -> axum::Router {
        app().layer(fixture.layer.optional())
    }
}

/// The tests of this file run one at a time: `tracing` caches each callsite's interest
/// process-wide, and a callsite first hit on a thread without a subscriber (the other test)
/// while this one installs its own can stay disabled for it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Everything the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn one_span_per_authentication_with_key_id_collection_and_outcome() {
    let _serial = SERIAL.lock().await;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    // Callsites first hit by the other test of this binary (no subscriber there) cached an
    // interest of "never"; ask again now that this thread has a subscriber.
    tracing::callsite::rebuild_interest_cache();

    let fixture = Fixture::new();
    let app = fixture.app();
    let created = fixture
        .key(NewKey::new("u", "alice").collection("users"))
        .await;
    let key = created.key.expose();
    let id = created.record.id.to_string();
    // A miss (the boxed path), a hit (decided inside `call`), then a revoked key.
    for _ in 0..2 {
        let reply = get_with(&app, "/whoami", &[("x-api-key", key.as_bytes())]).await;
        assert_eq!(reply.status, 200);
    }
    fixture.manager.revoke(created.record.id).await.unwrap();
    let reply = get_with(&app, "/whoami", &[("x-api-key", key.as_bytes())]).await;
    assert_eq!(reply.code(), "revoked_key");

    let text = captured.text();
    let closes: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("authenticate{") && l.contains(": close"))
        .collect();
    assert_eq!(closes.len(), 3, "{text}");
    for (line, outcome) in closes.iter().zip(["accepted", "accepted", "revoked_key"]) {
        assert!(line.contains(&format!("key_id={id}")), "{line}");
        assert!(line.contains("collection=\"users\""), "{line}");
        assert!(line.contains(&format!("outcome=\"{outcome}\"")), "{line}");
    }
    // The rejection's log line is inside the span.
    assert!(
        text.lines()
            .any(|l| l.contains("authenticate{") && l.contains("request rejected")),
        "{text}"
    );
    assert!(!text.contains(key), "the key leaked into the trace output");
}
