//! Webhooks (issue 14 §4): delivered to a real HTTP receiver on loopback, signatures checked
//! by the Standard Webhooks rule computed here independently; a receiver that is down is
//! retried with backoff; a `keywarden serve` killed mid-delivery still delivers after a
//! restart; targets outside the allowlist are refused; only `keys:admin` manages them.
#![cfg(all(feature = "webhooks", feature = "sqlite", feature = "postgres"))]

mod support;

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use keywarden::clock::{Clock, ManualClock};
use keywarden::manage::{ManageErrorKind, NewWebhook};
use keywarden::store::WebhookPatch;
use keywarden::webhooks::{WebhookDeliverer, WebhookTargets};
use keywarden::{ExpiresIn, KeyManager, KeyStore, MemoryStore, NewKey, SqliteStore};
use serde_json::Value;
use sha2::Sha256;
use time::{Duration, OffsetDateTime};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Delivery {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The Standard Webhooks check, written from the spec: base64 HMAC-SHA256 of
    /// `id.timestamp.body` under the base64-decoded part of `whsec_…`, in a `v1,` entry.
    fn signed_by(&self, secret: &str) -> bool {
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.strip_prefix("whsec_").unwrap())
            .unwrap();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
        mac.update(format!("{}.{}.", self.id, self.timestamp).as_bytes());
        mac.update(&self.body);
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        self.signature
            .split(' ')
            .any(|entry| entry == format!("v1,{expected}"))
    }
}

/// A receiver on loopback answering with `status` (200 unless set), optionally hanging.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Delivery>>>,
    status: Arc<AtomicU16>,
    /// Requests to hang (never answer) before answering normally.
    hang: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start() -> (Self, String) {
        let receiver = Self::default();
        receiver.status.store(200, Ordering::SeqCst);
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, format!("http://127.0.0.1:{}/hook", addr.port()))
    }

    fn got(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    receiver.got.lock().unwrap().push(Delivery {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        body: body.to_vec(),
    });
    if receiver
        .hang
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        tokio::time::sleep(StdDuration::from_secs(3600)).await;
    }
    StatusCode::from_u16(receiver.status.load(Ordering::SeqCst)).unwrap()
}

fn local() -> WebhookTargets {
    WebhookTargets::hosts(["127.0.0.1"]).allow_http(true)
}

#[tokio::test]
async fn events_are_delivered_signed_in_order_and_once_on_every_store() {
    for (name, store, pg) in support::every_store("webhooks").await {
        let (receiver, url) = Receiver::start().await;
        let manager = KeyManager::new(store.clone(), support::ring()).with_webhook_targets(local());
        // History before the subscription is not sent.
        manager
            .create(NewKey::new("before", "alice"))
            .await
            .unwrap();
        let all = manager
            .create_webhook(NewWebhook::new(&url, ["*"]))
            .await
            .unwrap();
        let revoked_only = manager
            .create_webhook(NewWebhook::new(&url, ["key.revoked"]))
            .await
            .unwrap();
        assert!(all.secret.starts_with("whsec_"), "{name}");
        let key = manager.create(NewKey::new("k", "alice")).await.unwrap();
        manager.revoke(key.record.id).await.unwrap();

        let deliverer = WebhookDeliverer::new(store.clone(), &support::ring()).targets(local());
        let round = deliverer.run_once().await.unwrap();
        assert_eq!((round.delivered, round.failed), (4, 0), "{name}");
        let got = receiver.got();
        assert_eq!(got.len(), 4, "{name}");
        let (to_all, to_revoked): (Vec<_>, Vec<_>) =
            got.iter().partition(|d| d.signed_by(&all.secret));
        assert_eq!(to_all.len(), 3, "{name}");
        assert_eq!(to_revoked.len(), 1, "{name}");
        assert!(to_revoked[0].signed_by(&revoked_only.secret));
        assert!(
            !to_revoked[0].signed_by(&all.secret),
            "each has its own secret"
        );
        let types: Vec<Value> = to_all.iter().map(|d| d.json()["type"].clone()).collect();
        // The second subscription's creation is an event too (of the first's: it came after).
        assert_eq!(
            types,
            ["webhook.created", "key.created", "key.revoked"],
            "{name}"
        );
        assert_eq!(
            to_all[0].json()["data"]["changes"]["webhook_id"],
            revoked_only.webhook.id.to_string()
        );
        assert_eq!(
            to_all[2].json()["data"]["key_id"],
            key.record.id.to_string()
        );
        assert_eq!(to_all[1].id, "evt_4", "{name}: the audit event number");
        assert_eq!(to_revoked[0].id, to_all[2].id, "one event, one id");
        let sent_at: i64 = to_all[0].timestamp.parse().unwrap();
        assert!((OffsetDateTime::now_utc().unix_timestamp() - sent_at).abs() < 60);
        // A tampered body no longer verifies.
        let mut tampered = to_all[2].clone();
        tampered.body = tampered.body.replace_all(b"alice", b"mallo");
        assert!(!tampered.signed_by(&all.secret), "{name}");
        // Nothing in a delivery is key material.
        let text = String::from_utf8_lossy(&to_all[1].body).into_owned();
        assert!(!text.contains(key.key.expose()), "{name}");

        // Delivered once: a second round sends nothing; the cursor says how far.
        assert_eq!(deliverer.run_once().await.unwrap().delivered, 0, "{name}");
        let view = manager.get_webhook(all.webhook.id).await.unwrap();
        assert_eq!(view.delivered_through, 5, "{name}");
        assert_eq!(view.attempts, 0);
        support::drop_schema(pg).await;
    }
}

trait ReplaceAll {
    fn replace_all(self, from: &[u8], to: &[u8]) -> Vec<u8>;
}

impl ReplaceAll for Vec<u8> {
    fn replace_all(self, from: &[u8], to: &[u8]) -> Vec<u8> {
        String::from_utf8(self)
            .unwrap()
            .replace(
                std::str::from_utf8(from).unwrap(),
                std::str::from_utf8(to).unwrap(),
            )
            .into_bytes()
    }
}

#[tokio::test]
async fn a_receiver_that_is_down_is_retried_with_backoff() {
    let (receiver, url) = Receiver::start().await;
    let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let manager = KeyManager::new(store.clone(), support::ring())
        .with_webhook_targets(local())
        .with_clock(Arc::new(clock.clone()));
    let hook = manager
        .create_webhook(NewWebhook::new(&url, ["key.created"]))
        .await
        .unwrap();
    manager.create(NewKey::new("k", "alice")).await.unwrap();
    let deliverer = WebhookDeliverer::new(store.clone(), &support::ring())
        .targets(local())
        .clock(Arc::new(clock.clone()));

    receiver.status.store(503, Ordering::SeqCst);
    let round = deliverer.run_once().await.unwrap();
    assert_eq!((round.delivered, round.failed), (0, 1));
    let view = manager.get_webhook(hook.webhook.id).await.unwrap();
    assert_eq!(view.attempts, 1);
    assert_eq!(view.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(
        view.delivered_through, 1,
        "its own creation, not delivered to itself"
    );
    assert_eq!(
        view.next_attempt_at,
        Some(clock.now() + Duration::seconds(5)),
        "first backoff: 5 s"
    );
    // Not due yet: no request.
    deliverer.run_once().await.unwrap();
    assert_eq!(receiver.got().len(), 1);
    clock.advance(Duration::seconds(6));
    deliverer.run_once().await.unwrap();
    assert_eq!(receiver.got().len(), 2);
    let view = manager.get_webhook(hook.webhook.id).await.unwrap();
    assert_eq!(view.attempts, 2);
    assert!(view.next_attempt_at.unwrap() >= clock.now() + Duration::seconds(10));
    assert!(view.failing_since.is_some());

    // Back up: the same event, with the same id, then nothing more.
    receiver.status.store(204, Ordering::SeqCst);
    clock.advance(Duration::seconds(11));
    let round = deliverer.run_once().await.unwrap();
    assert_eq!(round.delivered, 1);
    let got = receiver.got();
    assert_eq!(got.len(), 3);
    assert!(got
        .iter()
        .all(|d| d.id == got[0].id && d.signed_by(&hook.secret)));
    let view = manager.get_webhook(hook.webhook.id).await.unwrap();
    assert_eq!(
        (view.attempts, view.last_error, view.failing_since),
        (0, None, None)
    );
    assert_eq!(view.delivered_through, 2);

    // A paused subscription is skipped; resuming delivers what happened meanwhile.
    let pause = WebhookPatch {
        disabled: Some(true),
        ..WebhookPatch::default()
    };
    manager
        .update_webhook(hook.webhook.id, pause)
        .await
        .unwrap();
    manager.create(NewKey::new("k2", "alice")).await.unwrap();
    assert_eq!(deliverer.run_once().await.unwrap().delivered, 0);
    let resume = WebhookPatch {
        disabled: Some(false),
        ..WebhookPatch::default()
    };
    manager
        .update_webhook(hook.webhook.id, resume)
        .await
        .unwrap();
    assert_eq!(deliverer.run_once().await.unwrap().delivered, 1);
}

#[tokio::test]
async fn expiring_keys_are_announced_once_before_they_expire() {
    for (name, store, pg) in support::every_store("webhooks").await {
        let (receiver, url) = Receiver::start().await;
        let manager = KeyManager::new(store.clone(), support::ring()).with_webhook_targets(local());
        let hook = manager
            .create_webhook(NewWebhook::new(&url, ["key.expiring"]))
            .await
            .unwrap();
        let soon = manager
            .create(NewKey::new("soon", "alice").expires_in(ExpiresIn::After(Duration::days(3))))
            .await
            .unwrap();
        manager
            .create(NewKey::new("later", "alice").expires_in(ExpiresIn::After(Duration::days(30))))
            .await
            .unwrap();
        manager.create(NewKey::new("never", "alice")).await.unwrap();
        let revoked = manager
            .create(NewKey::new("gone", "alice").expires_in(ExpiresIn::After(Duration::days(2))))
            .await
            .unwrap();
        manager.revoke(revoked.record.id).await.unwrap();

        let deliverer = WebhookDeliverer::new(store.clone(), &support::ring())
            .targets(local())
            .expiring_lead(Duration::days(7));
        assert_eq!(deliverer.run_once().await.unwrap().delivered, 1, "{name}");
        let got = receiver.got();
        assert_eq!(got.len(), 1, "{name}");
        let body = got[0].json();
        assert_eq!(body["type"], "key.expiring");
        assert_eq!(body["data"]["key_id"], soon.record.id.to_string(), "{name}");
        assert_eq!(body["data"]["subject"], "alice");
        assert!(got[0].id.starts_with("exp_"), "{}", got[0].id);
        assert!(got[0].signed_by(&hook.secret));
        assert_eq!(
            deliverer.run_once().await.unwrap().delivered,
            0,
            "{name}: once"
        );
        support::drop_schema(pg).await;
    }
}

#[tokio::test]
async fn targets_outside_the_allowlist_and_bad_subscriptions_are_refused() {
    let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let manager = KeyManager::new(store.clone(), support::ring())
        .with_webhook_targets(WebhookTargets::hosts(["hooks.example.com"]));
    for (url, field) in [
        ("https://169.254.169.254/latest/meta-data", "url"),
        ("http://hooks.example.com/in", "url"),
        ("https://hooks.example.com.attacker.test/", "url"),
        ("not a url", "url"),
    ] {
        let error = manager
            .create_webhook(NewWebhook::new(url, ["*"]))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ManageErrorKind::Invalid, "{url}");
        assert_eq!(error.field(), Some(field), "{url}");
        assert!(
            !error.to_string().contains("169.254"),
            "never echoed: {error}"
        );
    }
    let error = manager
        .create_webhook(NewWebhook::new(
            "https://hooks.example.com/in",
            ["key.stolen"],
        ))
        .await
        .unwrap_err();
    assert_eq!(error.field(), Some("events"));
    assert!(manager
        .create_webhook(NewWebhook::new(
            "https://hooks.example.com/in",
            ["key.revoked"]
        ))
        .await
        .is_ok());
    // A target that was allowed and no longer is: the deliverer refuses it too.
    let (receiver, url) = Receiver::start().await;
    let open = KeyManager::new(store.clone(), support::ring()).with_webhook_targets(local());
    open.create_webhook(NewWebhook::new(&url, ["*"]))
        .await
        .unwrap();
    open.create(NewKey::new("k", "alice")).await.unwrap();
    let strict = WebhookDeliverer::new(store, &support::ring())
        .targets(WebhookTargets::hosts(["hooks.example.com"]));
    let round = strict.run_once().await.unwrap();
    assert_eq!(round.delivered, 0);
    assert!(receiver.got().is_empty());
    let views = open.list_webhooks().await.unwrap();
    assert!(views.iter().any(|v| v
        .last_error
        .as_deref()
        .is_some_and(|e| e.starts_with("target refused"))));
}

#[tokio::test]
async fn only_keys_admin_manages_webhooks_over_http_and_the_secret_is_shown_once() {
    use axum::body::Body;
    use http::Request;
    let layer = keywarden::ApiKeyLayer::builder()
        .store(Arc::new(MemoryStore::new()))
        .secrets(support::ring())
        .collection(keywarden::Collection::new("users"))
        .build()
        .unwrap();
    let manager = Arc::new(KeyManager::for_layer(&layer).with_webhook_targets(local()));
    let app = Router::new()
        .nest("/admin", keywarden::management_router(manager.clone()))
        .layer(layer);
    let admin = manager
        .create(NewKey::new("admin", "root").scope("keys:admin"))
        .await
        .unwrap();
    let own = manager
        .create(NewKey::new("self", "alice").scope("keys:self"))
        .await
        .unwrap();
    let call = |key: String, method: &'static str, uri: String, body: Option<&'static str>| {
        let app = app.clone();
        async move {
            let mut request = Request::builder()
                .method(method)
                .uri(uri)
                .header("x-api-key", key);
            if body.is_some() {
                request = request.header("content-type", "application/json");
            }
            support::send(
                &app,
                request.body(Body::from(body.unwrap_or_default())).unwrap(),
            )
            .await
        }
    };
    let admin_key = admin.key.expose().to_owned();
    let self_key = own.key.expose().to_owned();
    let body = r#"{"url": "http://127.0.0.1:9/hook", "events": ["key.revoked"]}"#;
    let denied = call(
        self_key.clone(),
        "POST",
        "/admin/webhooks".into(),
        Some(body),
    )
    .await;
    assert_eq!(denied.status, 403, "{}", denied.text());
    assert_eq!(denied.code(), "insufficient_scope");
    let denied = call(self_key, "GET", "/admin/webhooks".into(), None).await;
    assert_eq!(denied.status, 403);

    let created = call(
        admin_key.clone(),
        "POST",
        "/admin/webhooks".into(),
        Some(body),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.headers["cache-control"], "no-store");
    let json = created.json();
    assert!(json["secret"].as_str().unwrap().starts_with("whsec_"));
    let id = json["id"].as_str().unwrap().to_owned();
    let listed = call(admin_key.clone(), "GET", "/admin/webhooks".into(), None).await;
    assert_eq!(listed.status, 200);
    assert!(!listed.text().contains("whsec_"), "{}", listed.text());
    assert!(!listed.text().contains("secret"), "{}", listed.text());
    let shown = call(
        admin_key.clone(),
        "GET",
        format!("/admin/webhooks/{id}"),
        None,
    )
    .await;
    assert_eq!(shown.json()["events"], serde_json::json!(["key.revoked"]));
    let bad = call(
        admin_key.clone(),
        "POST",
        "/admin/webhooks".into(),
        Some(r#"{"url": "https://10.0.0.1/x", "events": ["nope"], "token": "kw_live_x"}"#),
    )
    .await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert!(!bad.text().contains("kw_live_x"));
    let patched = call(
        admin_key.clone(),
        "PATCH",
        format!("/admin/webhooks/{id}"),
        Some(r#"{"disabled": true}"#),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.text());
    assert_eq!(patched.json()["disabled"], true);
    let deleted = call(
        admin_key.clone(),
        "DELETE",
        format!("/admin/webhooks/{id}"),
        None,
    )
    .await;
    assert_eq!(deleted.status, 204);
    let gone = call(admin_key, "GET", format!("/admin/webhooks/{id}"), None).await;
    assert_eq!(gone.status, 404);
}

/// The outbox survives the sender: a `keywarden serve` killed (SIGKILL) while a delivery is in
/// flight delivers the event after a restart, with the same `webhook-id`.
#[cfg(all(feature = "cli", unix))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_killed_mid_delivery_delivers_after_a_restart() {
    use std::process::Command;
    use support::serve::ServeProcess;

    const SECRET: &str = "webhook-kill-test-secret-0123456789abcdefgh";
    let dir = support::TempDir::new("webhooks-kill");
    let (receiver, url) = Receiver::start().await;
    receiver.hang.store(1, Ordering::SeqCst);
    let store: Arc<dyn KeyStore> = Arc::new(SqliteStore::connect(&dir.db_url()).await.unwrap());
    let ring = keywarden::SecretRing::from_strs(SECRET, None).unwrap();
    let manager = KeyManager::new(store, ring).with_webhook_targets(local());
    let hook = manager
        .create_webhook(NewWebhook::new(&url, ["key.created"]))
        .await
        .unwrap();
    manager.create(NewKey::new("k", "alice")).await.unwrap();

    let serve = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keywarden"));
        cmd.current_dir(dir.path());
        for (var, _) in std::env::vars() {
            if var.starts_with("KEYWARDEN_") {
                cmd.env_remove(var);
            }
        }
        cmd.env("KEYWARDEN_DATABASE_URL", dir.db_url())
            .env("KEYWARDEN_SECRET", SECRET)
            .args([
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--webhook-hosts",
                "127.0.0.1",
                "--webhook-allow-http",
            ]);
        cmd
    };
    let wait_for = |n: usize| {
        let receiver = receiver.clone();
        async move {
            let deadline = std::time::Instant::now() + StdDuration::from_secs(40);
            while receiver.got().len() < n {
                assert!(std::time::Instant::now() < deadline, "no delivery #{n}");
                tokio::time::sleep(StdDuration::from_millis(50)).await;
            }
        }
    };
    let first = ServeProcess::spawn(serve(), dir.path(), "first");
    wait_for(1).await;
    // The request is in flight (the receiver hangs): kill the sender outright.
    drop(first);
    let second = ServeProcess::spawn(serve(), dir.path(), "second");
    wait_for(2).await;
    let got = receiver.got();
    assert_eq!(got[0].id, got[1].id, "the same event, the same id");
    assert!(got[1].signed_by(&hook.secret));
    assert_eq!(got[1].json()["type"], "key.created");
    // Delivered: the cursor moved, and nothing more is sent.
    let deadline = std::time::Instant::now() + StdDuration::from_secs(10);
    while manager
        .get_webhook(hook.webhook.id)
        .await
        .unwrap()
        .delivered_through
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "cursor never moved");
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    tokio::time::sleep(StdDuration::from_millis(1500)).await;
    assert_eq!(receiver.got().len(), 2);
    second.terminate();
}

/// SSRF defaults: non-public addresses are refused, as IP literals when a subscription is made
/// and as what a name resolves to when a delivery is sent; subscription changes are audited
/// (the host only, never the URL's path or query).
#[tokio::test]
async fn private_addresses_are_refused_by_default_and_subscriptions_are_audited() {
    let (receiver, url) = Receiver::start().await;
    let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let open_http = WebhookTargets::any().allow_http(true);
    let manager =
        KeyManager::new(store.clone(), support::ring()).with_webhook_targets(open_http.clone());
    let error = manager
        .create_webhook(NewWebhook::new(&url, ["*"]))
        .await
        .unwrap_err();
    assert_eq!(error.field(), Some("url"), "{error}");
    // A name is allowed when subscribing, but what it resolves to is checked when sending.
    let by_name = url.replace("127.0.0.1", "localhost") + "?token=receiver-secret";
    let hook = manager
        .create_webhook(NewWebhook::new(&by_name, ["key.created"]))
        .await
        .unwrap();
    manager.create(NewKey::new("k", "alice")).await.unwrap();
    // A lease that ends at once, so the second deliverer below may take over.
    let deliverer = WebhookDeliverer::new(store.clone(), &support::ring())
        .targets(open_http)
        .lease(StdDuration::ZERO);
    let round = deliverer.run_once().await.unwrap();
    assert_eq!((round.delivered, round.failed), (0, 1));
    assert!(
        receiver.got().is_empty(),
        "nothing reached the loopback receiver"
    );
    let view = manager.get_webhook(hook.webhook.id).await.unwrap();
    assert_eq!(view.last_error.as_deref(), Some("connection failed"));
    // Allowed explicitly, it is delivered.
    let allowed = WebhookDeliverer::new(store.clone(), &support::ring())
        .targets(WebhookTargets::any().allow_http(true).allow_private(true));
    // Pause and resume: resuming clears the failed attempt's backoff.
    for disabled in [true, false] {
        let patch = WebhookPatch {
            disabled: Some(disabled),
            ..WebhookPatch::default()
        };
        manager
            .update_webhook(hook.webhook.id, patch)
            .await
            .unwrap();
    }
    assert_eq!(allowed.run_once().await.unwrap().delivered, 1);
    assert_eq!(receiver.got().len(), 1);

    let events = manager
        .audit(&keywarden::audit::AuditQuery::default())
        .await
        .unwrap()
        .items;
    let created = events
        .iter()
        .find(|e| e.action.as_str() == "webhook.created")
        .expect("the subscription's creation is an audit event");
    assert_eq!(created.changes["host"], "localhost");
    assert_eq!(created.changes["webhook_id"], hook.webhook.id.to_string());
    let text = serde_json::to_string(&events).unwrap();
    assert!(!text.contains("receiver-secret"), "never the URL's query");
    assert!(events
        .iter()
        .any(|e| e.action.as_str() == "webhook.updated"));
}
