//! Every reveal is an audit event on the `keywarden::audit` tracing target, naming its actor and
//! never a secret. Alone in its test binary: `tracing` caches each call site's interest, and a
//! test on another thread registering the same call site while this one's scoped subscriber is
//! being installed can leave it cached as "never" (a race in `tracing-core`), which made this
//! check flaky among the unit tests.

use std::sync::{Arc, Mutex};

use keywarden::manage::{Actor, ManageErrorKind, RevealKeyRing};
use keywarden::{KeyManager, MemoryStore, NewKey, SecretRing};
use uuid::Uuid;

const A: &str = "reveal-key-a-0123456789abcdefghijklmnop";
const B: &str = "reveal-key-b-0123456789abcdefghijklmnop";

/// Captures formatted tracing output.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn every_reveal_is_an_audit_event_with_its_actor_and_no_secrets() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let secrets = SecretRing::from_strs("reveal-test-secret-0123456789abcdef", None).unwrap();
    let m = KeyManager::new(Arc::new(MemoryStore::new()), secrets)
        .with_reveal_keys(RevealKeyRing::from_strs(B, Some(A)).unwrap());
    let created = m.create(NewKey::new("k", "u")).await.unwrap();
    let caller = Actor::Key {
        id: Uuid::now_v7(),
        subject: "carol".into(),
    };
    m.reveal(created.record.id, &caller).await.unwrap();
    m.revoke(created.record.id).await.unwrap();
    let err = m.reveal(created.record.id, &Actor::Cli).await.unwrap_err();
    assert_eq!(err.kind(), ManageErrorKind::Inactive);
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let events: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("keywarden::audit"))
        .collect();
    assert_eq!(events.len(), 2, "{logs}");
    assert!(events[0].contains("outcome=\"revealed\""), "{logs}");
    assert!(events[0].contains(&format!("actor=key:{}", caller.key_id().unwrap())));
    assert!(events[0].contains("actor_subject=\"carol\""), "{logs}");
    assert!(events[0].contains(&format!("key_id={}", created.record.id)));
    assert!(events[1].contains("outcome=\"refused\""), "{logs}");
    assert!(events[1].contains("reason=Inactive") && events[1].contains("actor=cli"));
    for text in [
        logs.as_str(),
        &err.to_string(),
        &format!("{err:?}"),
        &format!("{m:?}"),
    ] {
        for secret in [A, B, created.key.expose()] {
            assert!(!text.contains(secret), "{text}");
        }
    }
}
