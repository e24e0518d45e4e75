//! The management HTTP API through a real Router with `oneshot`: the full key lifecycle,
//! `keys:self` isolation, authorization, every validation error path, store failures, and
//! what responses must never contain.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::{Extension, Router};
use http::Request;
use keywarden::{
    management_router, ratelimit::RateLimitPolicy, secret::Digest, secret::SecretId,
    store::KeyPage, store::KeyPatch, store::KeyQuery, store::KeyRecord, store::KeyUsage,
    store::StoreErrorKind, ExpiresIn, KeyManager, KeyStore, MemoryStore, NewKey, StoreError,
};
use serde_json::{json, Value};
use support::{ring, send, Fixture, Reply};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

/// Fields of a key view, exactly.
const VIEW_FIELDS: [&str; 24] = [
    "id",
    "name",
    "description",
    "display_start",
    "collection",
    "subject",
    "owner_kind",
    "scopes",
    "environment",
    "read_only",
    "metadata",
    "rate_limit",
    "allowed_ips",
    "credits",
    "refill",
    "state",
    "created_at",
    "updated_at",
    "expires_at",
    "last_used_at",
    "use_count",
    "revoked_at",
    "disabled",
    "rotated_from",
];

/// A fixture, the management API and `/whoami` behind the same layer, an admin key, and
/// every plaintext key seen so far (none may appear outside its own 201 response).
struct Env {
    fx: Fixture,
    api: Router,
    whoami: Router,
    admin: String,
    plaintexts: Mutex<Vec<String>>,
}

impl Env {
    async fn new() -> Self {
        Self::with(|b| b).await
    }

    /// With the layer configured by `configure` (the manager is made for that layer).
    async fn with(
        configure: impl FnOnce(keywarden::ApiKeyLayerBuilder) -> keywarden::ApiKeyLayerBuilder,
    ) -> Self {
        let fx = Fixture::with(configure);
        let manager = Arc::new(KeyManager::for_layer(&fx.layer));
        let api = Router::new()
            .nest("/admin", management_router(manager))
            .layer(fx.layer.clone());
        let whoami = fx.app();
        let admin = fx
            .key(NewKey::new("admin", "root").scope("keys:admin"))
            .await
            .key
            .expose()
            .to_owned();
        Self {
            fx,
            api,
            whoami,
            plaintexts: Mutex::new(vec![admin.clone()]),
            admin,
        }
    }

    /// A key made through the manager, remembered as a plaintext that must not leak.
    async fn key(&self, new: NewKey) -> (String, String) {
        let created = self.fx.key(new).await;
        let key = created.key.expose().to_owned();
        self.plaintexts.lock().unwrap().push(key.clone());
        (key, created.record.id.to_string())
    }

    async fn call(&self, key: &str, method: &str, uri: &str, body: Option<Value>) -> Reply {
        let body = body.map(|b| b.to_string());
        self.raw(key, method, uri, body.as_deref(), Some("application/json"))
            .await
    }

    async fn raw(
        &self,
        key: &str,
        method: &str,
        uri: &str,
        body: Option<&str>,
        content_type: Option<&str>,
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(uri);
        if !key.is_empty() {
            builder = builder.header("authorization", format!("Bearer {key}"));
        }
        if let (Some(ct), Some(_)) = (content_type, body) {
            builder = builder.header("content-type", ct);
        }
        let req = builder
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        let reply = send(&self.api, req).await;
        self.check_leaks(&reply);
        reply
    }

    /// Responses never carry stored secrets; a plaintext key appears only in the 201 that
    /// created it.
    fn check_leaks(&self, reply: &Reply) {
        let text = reply.text();
        for field in ["digest", "secret_id", "encrypted_key"] {
            assert!(!text.contains(field), "{field} in {text}");
        }
        let mut known = self.plaintexts.lock().unwrap();
        for key in known.iter() {
            assert!(!text.contains(key.as_str()), "a known key leaked: {text}");
        }
        if reply.status == 201 {
            let key = reply.json()["key"].as_str().unwrap().to_owned();
            known.push(key);
        } else if reply
            .headers
            .get("content-type")
            .is_some_and(|ct| ct == "application/json")
        {
            assert!(reply.json().get("key").is_none(), "{text}");
        }
    }

    async fn whoami(&self, key: &str) -> Reply {
        support::get_with(&self.whoami, "/whoami", &[("x-api-key", key.as_bytes())]).await
    }

    /// A key's view, as the admin sees it.
    async fn view(&self, id: &str) -> Value {
        let reply = self
            .call(&self.admin, "GET", &format!("/admin/keys/{id}"), None)
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()
    }

    /// How many keys `subject` has.
    async fn count(&self, subject: &str) -> usize {
        let uri = format!("/admin/keys?subject={subject}");
        ids(&self.call(&self.admin, "GET", &uri, None).await).len()
    }
}

fn policy(text: &str) -> RateLimitPolicy {
    text.parse().unwrap()
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap()
}

/// Asserts a 403 `insufficient_scope` that carries no key.
#[track_caller]
fn assert_forbidden(reply: &Reply) {
    assert_problem(reply, 403, "insufficient_scope");
    assert!(reply.json().get("key").is_none(), "{}", reply.text());
    assert!(!reply.text().contains("kw_"), "{}", reply.text());
}

fn ts(value: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(value.as_str().unwrap(), &Rfc3339).unwrap()
}

fn ids(reply: &Reply) -> Vec<String> {
    reply.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts a 422 naming exactly these fields.
#[track_caller]
fn assert_invalid(reply: &Reply, fields: &[&str]) {
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(reply.code(), "validation_failed");
    let json = reply.json();
    let named: BTreeSet<&str> = json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
            e["field"].as_str().unwrap()
        })
        .collect();
    assert_eq!(named, fields.iter().copied().collect(), "{}", reply.text());
}

#[track_caller]
fn assert_problem(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.code(), code, "{}", reply.text());
    let json = reply.json();
    assert!(json["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(json["detail"].is_string());
}

#[tokio::test]
async fn full_lifecycle_over_http() {
    let env = Env::new().await;
    let admin = env.admin.clone();

    // Create.
    let reply = env
        .call(
            &admin,
            "POST",
            "/admin/keys",
            Some(support::create_example()),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.headers["cache-control"], "no-store");
    let created = reply.json();
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("kw_live_"));
    assert!(key.starts_with(created["display_start"].as_str().unwrap()));
    let mut fields: BTreeSet<&str> = VIEW_FIELDS.into_iter().collect();
    fields.insert("key");
    assert_eq!(
        created
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        fields
    );
    assert_eq!(created["name"], "ci deploys");
    assert_eq!(created["description"], "for CI");
    assert_eq!(created["subject"], "alice");
    assert_eq!(created["collection"], "users", "the caller's collection");
    assert_eq!(created["owner_kind"], "user");
    assert_eq!(created["environment"], "live");
    assert_eq!(created["scopes"], json!(["deploy", "read"]));
    assert_eq!(created["metadata"], json!({"team": "infra"}));
    assert_eq!(created["rate_limit"], "100/min");
    assert_eq!(created["state"], "active");
    assert_eq!(created["read_only"], false);
    assert_eq!(created["disabled"], false);
    assert_eq!(created["use_count"], 0);
    assert!(created["revoked_at"].is_null());
    assert!(created["rotated_from"].is_null());
    assert_eq!(
        ts(&created["expires_at"]) - ts(&created["created_at"]),
        Duration::days(30)
    );

    // The new key authenticates at once.
    let who = env.whoami(&key).await;
    assert_eq!(who.status, 200, "{}", who.text());
    assert_eq!(who.json()["subject"], "alice");
    assert_eq!(who.json()["key_id"], id.as_str());

    // List: pagination and filters.
    let (_, bob_id) = env
        .key(
            NewKey::new("bob", "bob")
                .collection("teams")
                .owner_kind(keywarden::OwnerKind::Team),
        )
        .await;
    let (_, alice2_id) = env.key(NewKey::new("alice 2", "alice")).await;
    let first = env.call(&admin, "GET", "/admin/keys?limit=3", None).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let first_ids = ids(&first);
    assert_eq!(first_ids.len(), 3);
    let cursor = first.json()["next_cursor"].as_str().unwrap().to_owned();
    assert_eq!(cursor, first_ids[2]);
    let second = env
        .call(
            &admin,
            "GET",
            &format!("/admin/keys?limit=3&after={cursor}"),
            None,
        )
        .await;
    assert_eq!(ids(&second), vec![alice2_id.clone()]);
    assert!(second.json()["next_cursor"].is_null());
    assert_eq!(&first_ids[1..], &[id.clone(), bob_id.clone()]);
    for item in first.json()["items"].as_array().unwrap() {
        assert_eq!(
            item.as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect::<BTreeSet<_>>(),
            VIEW_FIELDS.into_iter().collect()
        );
    }
    let alices = env
        .call(&admin, "GET", "/admin/keys?subject=alice", None)
        .await;
    assert_eq!(ids(&alices), vec![id.clone(), alice2_id.clone()]);
    let teams = env
        .call(&admin, "GET", "/admin/keys?collection=teams", None)
        .await;
    assert_eq!(ids(&teams), vec![bob_id.clone()]);
    let paged = env
        .call(&admin, "GET", "/admin/keys?subject=alice&limit=1", None)
        .await;
    assert_eq!(ids(&paged), vec![id.clone()]);
    assert_eq!(paged.json()["next_cursor"], id.as_str());
    let active = env
        .call(&admin, "GET", "/admin/keys?state=active", None)
        .await;
    assert_eq!(ids(&active).len(), 4);
    // Every key so far is `live` (the store conformance suite tests the filter in depth).
    let live = env
        .call(&admin, "GET", "/admin/keys?environment=live", None)
        .await;
    assert_eq!(ids(&live), ids(&active));
    let test = env
        .call(
            &admin,
            "GET",
            "/admin/keys?environment=test&state=active",
            None,
        )
        .await;
    assert_eq!(test.status, 200, "{}", test.text());
    assert!(ids(&test).is_empty());

    // Get.
    let got = env
        .call(&admin, "GET", &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["name"], "ci deploys");
    assert_eq!(got.json()["expires_at"], created["expires_at"]);

    // Patch: every field, nulls clear; the layer sees the change at once.
    let patched = env
        .call(
            &admin,
            "PATCH",
            &format!("/admin/keys/{id}"),
            Some(support::patch_example()),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.text());
    let view = patched.json();
    assert_eq!(view["name"], "renamed");
    assert!(view["description"].is_null());
    assert_eq!(view["scopes"], json!(["read"]));
    assert_eq!(view["read_only"], true);
    assert_eq!(view["metadata"], json!({"team": "ops"}));
    assert!(view["rate_limit"].is_null());
    assert_eq!(view["expires_at"], "2099-01-01T00:00:00Z");
    let who = env.whoami(&key).await;
    assert_eq!(who.json()["scopes"], json!(["read"]));
    assert_eq!(who.json()["key_name"], "renamed");

    let disabled = env
        .call(
            &admin,
            "PATCH",
            &format!("/admin/keys/{id}"),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(disabled.json()["state"], "disabled");
    assert_eq!(env.whoami(&key).await.code(), "revoked_key");
    let enabled = env
        .call(
            &admin,
            "PATCH",
            &format!("/admin/keys/{id}"),
            Some(json!({"disabled": false, "metadata": null})),
        )
        .await;
    assert_eq!(enabled.json()["state"], "active");
    assert_eq!(
        enabled.json()["metadata"],
        json!({}),
        "null metadata clears to {{}}"
    );
    assert_eq!(env.whoami(&key).await.status, 200);

    // Rotate: both keys work until the grace runs out.
    let rotated = env
        .call(
            &admin,
            "POST",
            &format!("/admin/keys/{id}/rotate"),
            Some(json!({"grace": "1h"})),
        )
        .await;
    assert_eq!(rotated.status, 201, "{}", rotated.text());
    assert_eq!(rotated.headers["cache-control"], "no-store");
    let rotated = rotated.json();
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    let new_id = rotated["id"].as_str().unwrap().to_owned();
    assert_ne!(new_key, key);
    assert_eq!(rotated["rotated_from"], id.as_str());
    assert_eq!(rotated["name"], "renamed");
    assert_eq!(rotated["scopes"], json!(["read"]));
    assert_eq!(env.whoami(&key).await.status, 200);
    assert_eq!(env.whoami(&new_key).await.status, 200);
    let old = env
        .call(&admin, "GET", &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(
        ts(&old.json()["expires_at"]) - ts(&rotated["created_at"]),
        Duration::hours(1)
    );
    env.fx.clock.advance(Duration::minutes(61));
    assert_eq!(env.whoami(&key).await.code(), "expired_key");
    assert_eq!(env.whoami(&new_key).await.status, 200);
    let old = env
        .call(&admin, "GET", &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(old.json()["state"], "expired");
    let expired = env
        .call(&admin, "GET", "/admin/keys?state=expired", None)
        .await;
    assert_eq!(ids(&expired), vec![id.clone()]);

    // Revoke: rejected immediately, idempotent, and a revoked key cannot be rotated.
    let revoked = env
        .call(
            &admin,
            "POST",
            &format!("/admin/keys/{new_id}/revoke"),
            None,
        )
        .await;
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    assert_eq!(revoked.json()["state"], "revoked");
    assert!(revoked.json()["revoked_at"].is_string());
    let who = env.whoami(&new_key).await;
    assert_eq!(
        (who.status.as_u16(), who.code().as_str()),
        (401, "revoked_key")
    );
    let again = env
        .call(
            &admin,
            "POST",
            &format!("/admin/keys/{new_id}/revoke"),
            None,
        )
        .await;
    assert_eq!(again.json()["revoked_at"], revoked.json()["revoked_at"]);
    let conflict = env
        .call(
            &admin,
            "POST",
            &format!("/admin/keys/{new_id}/rotate"),
            None,
        )
        .await;
    assert_problem(&conflict, 409, "conflict");
    let listed = env
        .call(&admin, "GET", "/admin/keys?state=revoked", None)
        .await;
    assert_eq!(ids(&listed), vec![new_id.clone()]);

    // Delete.
    let deleted = env
        .call(&admin, "DELETE", &format!("/admin/keys/{new_id}"), None)
        .await;
    assert_eq!(deleted.status, 204);
    assert!(deleted.body.is_empty());
    for method in ["GET", "DELETE"] {
        let gone = env
            .call(&admin, method, &format!("/admin/keys/{new_id}"), None)
            .await;
        assert_problem(&gone, 404, "not_found");
    }
    assert_eq!(env.whoami(&new_key).await.code(), "invalid_key");
}

#[tokio::test]
async fn rotation_grace_defaults_to_a_day_and_zero_ends_the_old_key() {
    let env = Env::new().await;
    for body in [None, Some("{}"), Some("")] {
        // A key is rotated once (a second rotation is a 409): a fresh key for each form.
        let (_, id) = env.key(NewKey::new("k", "alice")).await;
        let reply = env
            .raw(
                &env.admin,
                "POST",
                &format!("/admin/keys/{id}/rotate"),
                body,
                Some("application/json"),
            )
            .await;
        assert_eq!(reply.status, 201, "{body:?}: {}", reply.text());
        let old = env
            .call(&env.admin, "GET", &format!("/admin/keys/{id}"), None)
            .await;
        assert_eq!(
            ts(&old.json()["expires_at"]) - ts(&reply.json()["created_at"]),
            Duration::hours(24)
        );
    }
    let (key, id) = env.key(NewKey::new("k", "alice")).await;
    let rotated = env
        .call(
            &env.admin,
            "POST",
            &format!("/admin/keys/{id}/rotate"),
            Some(json!({"grace": "0s"})),
        )
        .await;
    assert_eq!(rotated.status, 201, "{}", rotated.text());
    assert_eq!(env.whoami(&key).await.code(), "expired_key");
    // Rotated once already: a second rotation names the successor instead.
    let again = env
        .call(
            &env.admin,
            "POST",
            &format!("/admin/keys/{id}/rotate"),
            None,
        )
        .await;
    assert_eq!(again.status, 409, "{}", again.text());
    let new_key = rotated.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(env.whoami(&new_key).await.status, 200);
}

#[tokio::test]
async fn keys_self_is_confined_to_its_own_keys() {
    let env = Env::new().await;
    let (alice, alice_id) = env
        .key(
            NewKey::new("alice self", "alice")
                .scope("keys:self")
                .scope("read"),
        )
        .await;
    let (_, alice_other) = env.key(NewKey::new("alice other", "alice")).await;
    let (_, alice_team) = env
        .key(NewKey::new("same subject, other collection", "alice").collection("teams"))
        .await;
    let (bob, bob_id) = env
        .key(NewKey::new("bob self", "bob").scope("keys:self"))
        .await;

    // Someone else's key is indistinguishable from an unknown id.
    let unknown = Uuid::now_v7().to_string();
    let missing = env
        .call(&alice, "GET", &format!("/admin/keys/{unknown}"), None)
        .await;
    assert_problem(&missing, 404, "not_found");
    for other in [&bob_id, &alice_team] {
        let calls: [(&str, String, Option<Value>); 5] = [
            ("GET", format!("/admin/keys/{other}"), None),
            (
                "PATCH",
                format!("/admin/keys/{other}"),
                Some(json!({"name": "pwned"})),
            ),
            ("POST", format!("/admin/keys/{other}/revoke"), None),
            ("POST", format!("/admin/keys/{other}/rotate"), None),
            ("DELETE", format!("/admin/keys/{other}"), None),
        ];
        for (method, uri, body) in calls {
            let reply = env.call(&alice, method, &uri, body).await;
            assert_problem(&reply, 404, "not_found");
            let mut json = reply.json();
            json["detail"] = json["detail"]
                .as_str()
                .unwrap()
                .replace(other.as_str(), "ID")
                .into();
            let mut expected = missing.json();
            expected["detail"] = expected["detail"]
                .as_str()
                .unwrap()
                .replace(&unknown, "ID")
                .into();
            assert_eq!(json, expected, "{method} {uri}");
        }
    }
    assert_eq!(env.whoami(&bob).await.status, 200, "bob's key untouched");
    let bob_view = env
        .call(&env.admin, "GET", &format!("/admin/keys/{bob_id}"), None)
        .await;
    assert_eq!(bob_view.json()["name"], "bob self");
    assert_eq!(bob_view.json()["state"], "active");

    // Own keys are visible; listings show only them.
    let own = env
        .call(&alice, "GET", &format!("/admin/keys/{alice_other}"), None)
        .await;
    assert_eq!(own.status, 200);
    let listed = env.call(&alice, "GET", "/admin/keys", None).await;
    assert_eq!(ids(&listed), vec![alice_id.clone(), alice_other.clone()]);
    for uri in ["/admin/keys?subject=bob", "/admin/keys?collection=teams"] {
        let reply = env.call(&alice, "GET", uri, None).await;
        assert_eq!(
            reply.json(),
            json!({"items": [], "next_cursor": null}),
            "{uri}"
        );
    }
    let listed = env.call(&bob, "GET", "/admin/keys", None).await;
    assert_eq!(ids(&listed), vec![bob_id.clone()]);

    // Creating: subject, collection and owner kind are the caller's; no escalation.
    let made = env
        .call(&alice, "POST", "/admin/keys", Some(json!({"name": "mine"})))
        .await;
    assert_eq!(made.status, 201, "{}", made.text());
    assert_eq!(made.json()["subject"], "alice");
    assert_eq!(made.json()["collection"], "users");
    assert_eq!(made.json()["owner_kind"], "user");
    for body in [
        json!({"name": "n", "subject": "bob"}),
        json!({"name": "n", "collection": "teams"}),
        json!({"name": "n", "owner_kind": "service"}),
        json!({"name": "n", "scopes": ["write"]}),
        json!({"name": "n", "scopes": ["read", "keys:admin"]}),
        json!({"name": "n", "scopes": ["*"]}),
    ] {
        let reply = env
            .call(&alice, "POST", "/admin/keys", Some(body.clone()))
            .await;
        assert_problem(&reply, 403, "insufficient_scope");
        let challenge = reply.headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains("insufficient_scope"), "{body}");
    }
    let reply = env
        .call(
            &alice,
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "scopes": [""]})),
        )
        .await;
    assert_invalid(&reply, &["scopes"]);
    let made = env
        .call(
            &alice,
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "subject": "alice", "scopes": ["read", "keys:self"]})),
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.text());

    // Patching scopes: same rule.
    let escalate = env
        .call(
            &alice,
            "PATCH",
            &format!("/admin/keys/{alice_other}"),
            Some(json!({"scopes": ["admin"]})),
        )
        .await;
    assert_problem(&escalate, 403, "insufficient_scope");
    let fine = env
        .call(
            &alice,
            "PATCH",
            &format!("/admin/keys/{alice_other}"),
            Some(json!({"scopes": ["read"]})),
        )
        .await;
    assert_eq!(fine.status, 200, "{}", fine.text());
    let revoked = env
        .call(
            &alice,
            "POST",
            &format!("/admin/keys/{alice_other}/revoke"),
            None,
        )
        .await;
    assert_eq!(revoked.json()["state"], "revoked");
}

#[tokio::test]
async fn authorization_needs_a_key_with_a_management_scope() {
    let env = Env::new().await;
    let (reader, reader_id) = env.key(NewKey::new("reader", "carol").scope("read")).await;
    let (wild, _) = env.key(NewKey::new("wild", "dave").scope("keys:*")).await;
    let (read_only, _) = env
        .key(
            NewKey::new("ro admin", "erin")
                .scope("keys:admin")
                .read_only(true),
        )
        .await;

    let none = env.call("", "GET", "/admin/keys", None).await;
    assert_problem(&none, 401, "missing_credentials");

    // Checked before the body is read: a bad body still gets 403.
    for (method, uri) in [
        ("GET", "/admin/keys".to_owned()),
        ("POST", "/admin/keys".to_owned()),
        ("GET", format!("/admin/keys/{reader_id}")),
        ("PATCH", format!("/admin/keys/{reader_id}")),
        ("POST", format!("/admin/keys/{reader_id}/revoke")),
        ("POST", format!("/admin/keys/{reader_id}/rotate")),
        ("DELETE", format!("/admin/keys/{reader_id}")),
    ] {
        let reply = env
            .raw(
                &reader,
                method,
                &uri,
                Some("{not json"),
                Some("application/json"),
            )
            .await;
        assert_problem(&reply, 403, "insufficient_scope");
        assert!(reply.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("error=\"insufficient_scope\""));
    }

    // Management scopes are granted only by name: `keys:*` is not one of them.
    let listed = env.call(&wild, "GET", "/admin/keys", None).await;
    assert_forbidden(&listed);

    assert_eq!(
        env.call(&read_only, "GET", "/admin/keys", None)
            .await
            .status,
        200
    );
    let write = env
        .call(
            &read_only,
            "POST",
            "/admin/keys",
            Some(json!({"name": "n"})),
        )
        .await;
    assert_problem(&write, 403, "insufficient_scope");

    // Without the layer in front, the principal extractor fails closed.
    let bare = Router::new().nest(
        "/admin",
        management_router(Arc::new(KeyManager::for_layer(&env.fx.layer))),
    );
    let reply = send(
        &bare,
        Request::get("/admin/keys").body(Body::empty()).unwrap(),
    )
    .await;
    assert_problem(&reply, 401, "missing_credentials");
}

#[tokio::test]
async fn malformed_bodies_are_400() {
    let env = Env::new().await;
    let admin = env.admin.clone();
    let (_, id) = env.key(NewKey::new("k", "alice")).await;
    let cases: [(&str, String, Option<&str>, Option<&str>); 8] = [
        (
            "POST",
            "/admin/keys".into(),
            Some("{\"name\":"),
            Some("application/json"),
        ),
        (
            "POST",
            "/admin/keys".into(),
            Some("{\"name\": \"x\"} trailing"),
            Some("application/json"),
        ),
        (
            "POST",
            "/admin/keys".into(),
            Some("{\"name\": \"x\"}"),
            Some("text/plain"),
        ),
        (
            "POST",
            "/admin/keys".into(),
            Some("{\"name\": \"x\"}"),
            None,
        ),
        ("POST", "/admin/keys".into(), None, None),
        (
            "POST",
            "/admin/keys".into(),
            Some("[1, 2]"),
            Some("application/json"),
        ),
        (
            "PATCH",
            format!("/admin/keys/{id}"),
            Some("\"name\""),
            Some("application/json"),
        ),
        (
            "POST",
            format!("/admin/keys/{id}/rotate"),
            Some("{grace: 1h}"),
            Some("application/json"),
        ),
    ];
    for (method, uri, body, content_type) in cases {
        let reply = env.raw(&admin, method, &uri, body, content_type).await;
        assert_problem(&reply, 400, "invalid_request");
        assert!(reply.json().get("errors").is_none());
    }
    // A JSON subtype is JSON.
    let reply = env
        .raw(
            &admin,
            "PATCH",
            &format!("/admin/keys/{id}"),
            Some("{\"name\": \"merged\"}"),
            Some("application/merge-patch+json; charset=utf-8"),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test]
async fn invalid_fields_are_422_naming_the_field() {
    let env = Env::new().await;
    let admin = env.admin.clone();
    let creates = [
        (json!({"name": "x", "colour": "red"}), vec!["body"]),
        (
            json!({"name": "x", "colour": "red", "shade": "dark"}),
            vec!["body"],
        ),
        (
            json!({"name": "x", "expires_in": "forever"}),
            vec!["expires_in"],
        ),
        (json!({"name": "x", "expires_in": "0d"}), vec!["expires_in"]),
        (
            json!({"name": "x", "expires_in": "30d", "expires_at": "2099-01-01T00:00:00Z"}),
            vec!["expires_at"],
        ),
        (
            json!({"name": "x", "expires_at": "tomorrow"}),
            vec!["expires_at"],
        ),
        (
            json!({"name": "x", "expires_at": "2000-01-01T00:00:00Z"}),
            vec!["expires_at"],
        ),
        (
            json!({"name": "x", "rate_limit": "lots"}),
            vec!["rate_limit"],
        ),
        (
            json!({"name": "x", "owner_kind": "robot"}),
            vec!["owner_kind"],
        ),
        (
            json!({"name": "x", "environment": "prod"}),
            vec!["environment"],
        ),
        (json!({"name": "x", "metadata": [1]}), vec!["metadata"]),
        (
            json!({"name": "x", "collection": "has space"}),
            vec!["collection"],
        ),
        (json!({"name": "x", "subject": ""}), vec!["subject"]),
        (json!({"name": ""}), vec!["name"]),
        (json!({"name": "   "}), vec!["name"]),
        (json!({}), vec!["name"]),
        (
            json!({"name": 5, "read_only": "yes", "scopes": "read"}),
            vec!["name", "read_only", "scopes"],
        ),
        // A key pasted into the wrong field is not echoed back (checked in `raw`).
        (
            json!({"name": "x", "read_only": env.admin.clone()}),
            vec!["read_only"],
        ),
    ];
    for (body, fields) in creates {
        let reply = env
            .call(&admin, "POST", "/admin/keys", Some(body.clone()))
            .await;
        assert_invalid(&reply, &fields);
    }
    let unknown = env
        .call(
            &admin,
            "POST",
            "/admin/keys",
            Some(json!({"name": "x", "colour": "red"})),
        )
        .await;
    assert_eq!(unknown.json()["errors"][0]["message"], "unknown field");

    let (_, id) = env.key(NewKey::new("k", "alice")).await;
    let patches = [
        (json!({"expires_at": "soon"}), "expires_at"),
        (json!({"rate_limit": 5}), "rate_limit"),
        (json!({"rate_limit": "fast"}), "rate_limit"),
        (json!({"name": ""}), "name"),
        (json!({"scopes": [""]}), "scopes"),
        (json!({"metadata": "text"}), "metadata"),
        (json!({"disabled": "no"}), "disabled"),
        (json!({"revoked_at": "2030-01-01T00:00:00Z"}), "body"),
        (json!({"subject": "bob"}), "body"),
    ];
    for (body, field) in patches {
        let reply = env
            .call(&admin, "PATCH", &format!("/admin/keys/{id}"), Some(body))
            .await;
        assert_invalid(&reply, &[field]);
    }
    for (body, field) in [
        (json!({"grace": "-1h"}), "grace"),
        (json!({"grace": "soon"}), "grace"),
        (json!({"grace": 5}), "grace"),
        (json!({"graces": "1h"}), "body"),
    ] {
        let reply = env
            .call(
                &admin,
                "POST",
                &format!("/admin/keys/{id}/rotate"),
                Some(body),
            )
            .await;
        assert_invalid(&reply, &[field]);
    }
    for (query, field) in [
        ("state=bogus", "state"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("after=xyz", "after"),
        ("colour=red", "query"),
        ("colour=red&shade=dark", "query"),
    ] {
        let reply = env
            .call(&admin, "GET", &format!("/admin/keys?{query}"), None)
            .await;
        assert_invalid(&reply, &[field]);
    }
}

#[tokio::test]
async fn bad_and_unknown_ids_are_problems() {
    let env = Env::new().await;
    let admin = env.admin.clone();
    let unknown = Uuid::now_v7();
    // The admin key itself as a path segment: never echoed (checked in `raw`).
    for segment in ["not-a-uuid", "123", admin.as_str()] {
        for (method, suffix, body) in [
            ("GET", "", None),
            ("PATCH", "", Some(json!({"name": "x"}))),
            ("DELETE", "", None),
            ("POST", "/revoke", None),
            ("POST", "/rotate", None),
        ] {
            let reply = env
                .call(
                    &admin,
                    method,
                    &format!("/admin/keys/{segment}{suffix}"),
                    body,
                )
                .await;
            assert_invalid(&reply, &["id"]);
        }
    }
    for (method, suffix, body) in [
        ("GET", "", None),
        ("PATCH", "", Some(json!({"name": "x"}))),
        ("DELETE", "", None),
        ("POST", "/revoke", None),
        ("POST", "/rotate", None),
    ] {
        let reply = env
            .call(
                &admin,
                method,
                &format!("/admin/keys/{unknown}{suffix}"),
                body,
            )
            .await;
        assert_problem(&reply, 404, "not_found");
    }
}

/// A memory store that fails every call while `down` is set.
#[derive(Debug, Default)]
struct Flaky {
    inner: MemoryStore,
    down: AtomicBool,
}

impl Flaky {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "connection refused to db.internal:5432",
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl KeyStore for Flaky {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.check()?;
        self.inner.insert(record).await
    }
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        self.check()?;
        self.inner.find_by_digest(digest).await
    }
    async fn get(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.check()?;
        self.inner.get(id).await
    }
    async fn update(
        &self,
        id: Uuid,
        patch: &KeyPatch,
        now: OffsetDateTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.check()?;
        self.inner.update(id, patch, now).await
    }
    async fn add_digest(
        &self,
        id: Uuid,
        old: &Digest,
        new: &Digest,
        secret_id: SecretId,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.add_digest(id, old, new, secret_id).await
    }
    async fn delete(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.check()?;
        self.inner.delete(id).await
    }
    async fn list(&self, query: &KeyQuery) -> Result<KeyPage, StoreError> {
        self.check()?;
        self.inner.list(query).await
    }
    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        self.check()?;
        self.inner.record_usage(usage).await
    }
    async fn apply_audited(
        &self,
        change: keywarden::store::KeyChange<'_>,
        audit: &keywarden::store::AuditWrite<'_>,
    ) -> Result<keywarden::store::Applied, StoreError> {
        self.check()?;
        self.inner.apply_audited(change, audit).await
    }
}

#[tokio::test]
async fn store_failures_are_503_with_retry_after() {
    let store = Arc::new(Flaky::default());
    let manager = Arc::new(KeyManager::new(store.clone(), ring()));
    let id = manager
        .create(NewKey::new("k", "alice"))
        .await
        .unwrap()
        .record
        .id;
    // The principal as the layer would insert it.
    let api = Router::new()
        .nest("/admin", management_router(manager))
        .layer(Extension(
            keywarden::testing::PrincipalBuilder::new("test")
                .scopes(["keys:admin"])
                .build(),
        ));
    store.down.store(true, Ordering::SeqCst);
    for (method, uri, body) in [
        ("GET", "/admin/keys".to_owned(), ""),
        ("POST", "/admin/keys".to_owned(), "{\"name\": \"n\"}"),
        ("GET", format!("/admin/keys/{id}"), ""),
        ("PATCH", format!("/admin/keys/{id}"), "{\"name\": \"n\"}"),
        ("POST", format!("/admin/keys/{id}/rotate"), ""),
        ("DELETE", format!("/admin/keys/{id}"), ""),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(&uri)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let reply = send(&api, req).await;
        assert_problem(&reply, 503, "store_unavailable");
        assert_eq!(reply.headers["retry-after"], "1");
        assert!(!reply.text().contains("db.internal"), "{}", reply.text());
    }
    store.down.store(false, Ordering::SeqCst);
    let reply = send(
        &api,
        Request::get(format!("/admin/keys/{id}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
}

/// S1: a rotation hands over a new plaintext with the old key's powers, so `keys:self`
/// rotates only keys no more powerful than itself.
#[tokio::test]
async fn keys_self_rotates_only_keys_no_more_powerful_than_itself() {
    let env = Env::new().await;
    let (alice, alice_id) = env
        .key(
            NewKey::new("alice self", "alice")
                .scope("keys:self")
                .scope("read")
                .expires_in(ExpiresIn::DAYS_30)
                .rate_limit(policy("1000/min")),
        )
        .await;
    let base = || {
        NewKey::new("sibling", "alice")
            .scope("read")
            .expires_in(ExpiresIn::DAYS_7)
            .rate_limit(policy("10/min"))
    };
    let (_, admin_sibling) = env.key(base().scope("keys:admin")).await;
    let (_, test_sibling) = env.key(base().environment("test")).await;
    let (_, forever) = env.key(base().expires_in(ExpiresIn::Unlimited)).await;
    let (_, longer) = env.key(base().expires_in(ExpiresIn::DAYS_90)).await;
    let (_, unlimited) = env
        .key(
            NewKey::new("no rate limit", "alice")
                .scope("read")
                .expires_in(ExpiresIn::DAYS_7),
        )
        .await;
    let (_, faster) = env.key(base().rate_limit(policy("100/s"))).await;
    let (_, disabled) = env.key(base()).await;
    let off = env
        .call(
            &env.admin,
            "PATCH",
            &format!("/admin/keys/{disabled}"),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(off.status, 200, "{}", off.text());

    let keys = env.count("alice").await;
    for id in [
        &admin_sibling,
        &test_sibling,
        &forever,
        &longer,
        &unlimited,
        &faster,
        &disabled,
    ] {
        let before = env.view(id).await;
        let reply = env
            .call(&alice, "POST", &format!("/admin/keys/{id}/rotate"), None)
            .await;
        assert_forbidden(&reply);
        assert_eq!(env.view(id).await, before, "the old key is untouched");
    }
    assert_eq!(env.count("alice").await, keys, "no key was created");

    // A key within the caller's powers rotates.
    let (_, sibling) = env.key(base()).await;
    let rotated = env
        .call(
            &alice,
            "POST",
            &format!("/admin/keys/{sibling}/rotate"),
            None,
        )
        .await;
    assert_eq!(rotated.status, 201, "{}", rotated.text());
    assert_eq!(rotated.json()["scopes"], json!(["read"]));

    // The new key gets the old key's lifetime from now, but never outlives the caller.
    let alice_expiry = env.view(&alice_id).await["expires_at"].clone();
    env.fx.clock.advance(Duration::days(10));
    let renewed = env
        .call(
            &alice,
            "POST",
            &format!("/admin/keys/{alice_id}/rotate"),
            None,
        )
        .await;
    assert_eq!(renewed.status, 201, "{}", renewed.text());
    assert_eq!(renewed.json()["expires_at"], alice_expiry);
    assert_eq!(renewed.json()["rate_limit"], "1000/min");
    let new_key = renewed.json()["key"].as_str().unwrap().to_owned();
    let who = env.whoami(&new_key).await;
    assert_eq!(who.status, 200, "{}", who.text());
    assert_eq!(who.json()["expires_at"], alice_expiry);

    // An admin rotates any active key, keeping its lifetime...
    let reply = env
        .call(
            &env.admin,
            "POST",
            &format!("/admin/keys/{forever}/rotate"),
            None,
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.json()["expires_at"], Value::Null);
    // ...but nobody rotates a dead key back to life (the 7-day siblings have expired by now,
    // one is disabled): reissuing one is a `create`.
    for id in [&admin_sibling, &test_sibling, &disabled] {
        let reply = env
            .call(
                &env.admin,
                "POST",
                &format!("/admin/keys/{id}/rotate"),
                None,
            )
            .await;
        assert_eq!(reply.status, 409, "{}", reply.text());
        assert_eq!(reply.code(), "conflict");
    }
}

/// S2: `keys:self` may only tighten what an admin set on its keys, itself included.
#[tokio::test]
async fn keys_self_only_tightens_its_keys() {
    let env = Env::new().await;
    let (alice, alice_id) = env
        .key(
            NewKey::new("alice self", "alice")
                .scope("keys:self")
                .scope("read")
                .expires_in(ExpiresIn::DAYS_30)
                .rate_limit(policy("1000/min")),
        )
        .await;
    let alice_expiry = ts(&env.view(&alice_id).await["expires_at"]);
    let restricted = || {
        NewKey::new("restricted", "alice")
            .scope("read")
            .read_only(true)
            .expires_in(ExpiresIn::DAYS_7)
            .rate_limit(policy("10/min"))
    };
    let (_, sibling) = env.key(restricted()).await;
    let off = env
        .call(
            &env.admin,
            "PATCH",
            &format!("/admin/keys/{sibling}"),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(off.status, 200, "{}", off.text());
    let sibling_expiry = ts(&env.view(&sibling).await["expires_at"]);

    refused(
        &env,
        &alice,
        &sibling,
        vec![
            json!({"disabled": false}),
            json!({"disabled": false, "name": "with a harmless change"}),
            json!({"read_only": false}),
            json!({"expires_at": null}),
            json!({"expires_at": rfc3339(sibling_expiry + Duration::seconds(1))}),
            json!({"rate_limit": null}),
            json!({"rate_limit": "11/min"}),
            json!({"rate_limit": "10/min,burst=11"}),
            json!({"rate_limit": "1/s"}),
        ],
    )
    .await;
    // Its own restrictions, too.
    refused(
        &env,
        &alice,
        &alice_id,
        vec![
            json!({"expires_at": null}),
            json!({"expires_at": rfc3339(alice_expiry + Duration::seconds(1))}),
            json!({"rate_limit": null}),
            json!({"rate_limit": "2000/min"}),
        ],
    )
    .await;
    // Never later than the caller, even on a key that does not expire.
    let (_, forever) = env.key(NewKey::new("forever", "alice")).await;
    refused(
        &env,
        &alice,
        &forever,
        vec![
            json!({"expires_at": null}),
            json!({"expires_at": rfc3339(alice_expiry + Duration::days(1))}),
        ],
    )
    .await;
    let bounded = env
        .call(
            &alice,
            "PATCH",
            &format!("/admin/keys/{forever}"),
            Some(json!({"expires_at": rfc3339(alice_expiry), "rate_limit": "5/min"})),
        )
        .await;
    assert_eq!(bounded.status, 200, "{}", bounded.text());
    assert_eq!(ts(&bounded.json()["expires_at"]), alice_expiry);

    // Tightening, and the free fields, are fine.
    let (_, open) = env
        .key(
            NewKey::new("open", "alice")
                .scope("read")
                .expires_in(ExpiresIn::DAYS_7)
                .rate_limit(policy("10/min")),
        )
        .await;
    let earlier = rfc3339(sibling_expiry - Duration::days(1));
    let tightened = env
        .call(
            &alice,
            "PATCH",
            &format!("/admin/keys/{open}"),
            Some(json!({
                "name": "renamed",
                "description": "tightened",
                "metadata": {"why": "least privilege"},
                "scopes": ["read"],
                "read_only": true,
                "expires_at": earlier,
                "rate_limit": "10/min,burst=5",
                "disabled": true,
            })),
        )
        .await;
    assert_eq!(tightened.status, 200, "{}", tightened.text());
    let view = tightened.json();
    assert_eq!(view["name"], "renamed");
    assert_eq!(view["read_only"], true);
    assert_eq!(view["expires_at"], earlier.as_str());
    assert_eq!(view["rate_limit"], "10/min,burst=5");
    assert_eq!(view["state"], "disabled");
    // Restating current values is not loosening.
    let same = env
        .call(
            &alice,
            "PATCH",
            &format!("/admin/keys/{open}"),
            Some(json!({
                "read_only": true,
                "disabled": true,
                "expires_at": earlier,
                "rate_limit": "10/min,burst=5",
                "name": "again",
            })),
        )
        .await;
    assert_eq!(same.status, 200, "{}", same.text());
    assert_eq!(same.json()["name"], "again");
    assert_eq!(same.json()["state"], "disabled");

    // An admin may loosen anything.
    let loosened = env
        .call(
            &env.admin,
            "PATCH",
            &format!("/admin/keys/{sibling}"),
            Some(json!({
                "disabled": false,
                "read_only": false,
                "expires_at": null,
                "rate_limit": null,
            })),
        )
        .await;
    assert_eq!(loosened.status, 200, "{}", loosened.text());
    let view = loosened.json();
    assert_eq!(view["state"], "active");
    assert_eq!(view["read_only"], false);
    assert!(view["expires_at"].is_null());
    assert!(view["rate_limit"].is_null());
}

/// Each PATCH is a 403 that leaves the key as it was.
async fn refused(env: &Env, caller: &str, id: &str, bodies: Vec<Value>) {
    let uri = format!("/admin/keys/{id}");
    // Usage is recorded in the background; everything else must stay.
    let settings = |mut view: Value| {
        let fields = view.as_object_mut().unwrap();
        fields.remove("last_used_at");
        fields.remove("use_count");
        view
    };
    for body in bodies {
        let before = settings(env.view(id).await);
        let reply = env.call(caller, "PATCH", &uri, Some(body.clone())).await;
        assert_forbidden(&reply);
        let after = settings(env.view(id).await);
        assert_eq!(after, before, "{body}: the record is unchanged");
    }
}

/// S3: a `keys:self` key creates keys in its own environment, expiring no later and
/// limited no more loosely than itself; omitted expiry and rate limit are inherited.
#[tokio::test]
async fn keys_self_creates_no_key_beyond_itself() {
    let env = Env::new().await;
    let (alice, alice_id) = env
        .key(
            NewKey::new("alice self", "alice")
                .scope("keys:self")
                .scope("read")
                .expires_in(ExpiresIn::DAYS_30)
                .rate_limit(policy("1000/min")),
        )
        .await;
    let alice_expiry = env.view(&alice_id).await["expires_at"].clone();

    let inherited = env
        .call(&alice, "POST", "/admin/keys", Some(json!({"name": "n"})))
        .await;
    assert_eq!(inherited.status, 201, "{}", inherited.text());
    assert_eq!(inherited.json()["expires_at"], alice_expiry);
    assert_eq!(inherited.json()["rate_limit"], "1000/min");
    assert_eq!(inherited.json()["environment"], "live");

    let tighter = env
        .call(
            &alice,
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "expires_in": "7d", "rate_limit": "10/min"})),
        )
        .await;
    assert_eq!(tighter.status, 201, "{}", tighter.text());
    let view = tighter.json();
    assert_eq!(
        ts(&view["expires_at"]) - ts(&view["created_at"]),
        Duration::days(7)
    );
    assert_eq!(view["rate_limit"], "10/min");
    let same = env
        .call(
            &alice,
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "expires_at": alice_expiry, "rate_limit": "1000/min"})),
        )
        .await;
    assert_eq!(same.status, 201, "{}", same.text());

    let keys = env.count("alice").await;
    let later = rfc3339(ts(&alice_expiry) + Duration::seconds(1));
    for body in [
        json!({"name": "n", "environment": "test"}),
        json!({"name": "n", "expires_in": "unlimited"}),
        json!({"name": "n", "expires_in": "90d"}),
        json!({"name": "n", "expires_at": later}),
        json!({"name": "n", "rate_limit": "1001/min"}),
        json!({"name": "n", "rate_limit": "1000/min,burst=1001"}),
        json!({"name": "n", "rate_limit": "20/s"}),
    ] {
        let reply = env
            .call(&alice, "POST", "/admin/keys", Some(body.clone()))
            .await;
        assert_forbidden(&reply);
        assert!(
            reply.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("insufficient_scope"),
            "{body}"
        );
    }
    assert_eq!(env.count("alice").await, keys, "no key was created");

    // A test key makes test keys only.
    let (tester, _) = env
        .key(
            NewKey::new("tester", "tess")
                .scope("keys:self")
                .environment("test"),
        )
        .await;
    let made = env
        .call(&tester, "POST", "/admin/keys", Some(json!({"name": "t"})))
        .await;
    assert_eq!(made.status, 201, "{}", made.text());
    assert!(made.json()["key"].as_str().unwrap().starts_with("kw_test_"));
    assert_eq!(made.json()["environment"], "test");
    let live = env
        .call(
            &tester,
            "POST",
            "/admin/keys",
            Some(json!({"name": "t", "environment": "live"})),
        )
        .await;
    assert_forbidden(&live);

    // An admin is not bound by its own key.
    let free = env
        .call(
            &env.admin,
            "POST",
            "/admin/keys",
            Some(json!({"name": "a", "subject": "alice", "environment": "test"})),
        )
        .await;
    assert_eq!(free.status, 201, "{}", free.text());
    assert_eq!(free.json()["environment"], "test");
    assert!(free.json()["expires_at"].is_null());
    assert!(free.json()["rate_limit"].is_null());
}

/// S9: names the client sent are never repeated, since they may be keys.
#[tokio::test]
async fn unknown_names_are_never_echoed() {
    let env = Env::new().await;
    let admin = env.admin.clone();
    let (_, id) = env.key(NewKey::new("k", "alice")).await;
    for query in [
        admin.clone(),
        format!("{admin}=1"),
        format!("limit=5&{admin}=x&other=y"),
    ] {
        let reply = env
            .call(&admin, "GET", &format!("/admin/keys?{query}"), None)
            .await;
        assert_invalid(&reply, &["query"]);
        assert!(!reply.text().contains(&admin), "{}", reply.text());
        assert!(!reply.text().contains("kw_"), "{}", reply.text());
    }
    for (method, uri, mut body) in [
        ("POST", "/admin/keys".to_owned(), json!({"name": "x"})),
        ("PATCH", format!("/admin/keys/{id}"), json!({})),
        ("POST", format!("/admin/keys/{id}/rotate"), json!({})),
    ] {
        body[admin.as_str()] = json!(1);
        let reply = env.call(&admin, method, &uri, Some(body)).await;
        assert_invalid(&reply, &["body"]);
        assert_eq!(reply.json()["errors"][0]["message"], "unknown field");
        assert!(
            !reply.text().contains("kw_"),
            "{method} {uri}: {}",
            reply.text()
        );
    }
    // A key pasted as a scope: the refusal names its position only.
    let (alice, _) = env
        .key(NewKey::new("alice self", "alice").scope("keys:self"))
        .await;
    let reply = env
        .call(
            &alice,
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "scopes": ["keys:self", admin]})),
        )
        .await;
    assert_forbidden(&reply);
    assert!(reply.json()["detail"]
        .as_str()
        .unwrap()
        .contains("scopes[1]"));
}

/// S10: NUL (which Postgres cannot store) and other control characters in free text are a
/// 422 at the edge, not a store error.
#[tokio::test]
async fn control_characters_in_free_text_are_422() {
    let env = Env::new().await;
    let admin = env.admin.clone();
    let (_, id) = env.key(NewKey::new("k", "alice")).await;
    let cases = [
        (json!({"description": "a\u{0}b"}), "description"),
        (json!({"description": "\u{1b}[31mred"}), "description"),
        (json!({"metadata": {"k": "v\u{0}"}}), "metadata"),
        (json!({"metadata": {"k\u{0}": "v"}}), "metadata"),
        (
            json!({"metadata": {"a": [1, {"b": ["ok", "\u{7f}"]}]}}),
            "metadata",
        ),
    ];
    for (body, field) in cases {
        let mut create = body.clone();
        create["name"] = json!("n");
        let reply = env.call(&admin, "POST", "/admin/keys", Some(create)).await;
        assert_invalid(&reply, &[field]);
        let before = env.view(&id).await;
        let reply = env
            .call(&admin, "PATCH", &format!("/admin/keys/{id}"), Some(body))
            .await;
        assert_invalid(&reply, &[field]);
        assert_eq!(env.view(&id).await, before);
    }
    let clean = env
        .call(
            &admin,
            "POST",
            "/admin/keys",
            Some(json!({
                "name": "n",
                "description": "naïve café ✓",
                "metadata": {"ünïcode": ["fine", {"nested": "too"}]},
            })),
        )
        .await;
    assert_eq!(clean.status, 201, "{}", clean.text());
}

/// Every management route, with a body each would accept from an admin. `{id}` is `id`.
fn every_route(id: &str) -> Vec<(&'static str, String, Option<Value>)> {
    vec![
        ("GET", "/admin/keys".to_owned(), None),
        (
            "POST",
            "/admin/keys".to_owned(),
            Some(json!({"name": "made by a wildcard", "subject": "mallory", "scopes": ["*"]})),
        ),
        ("GET", format!("/admin/keys/{id}"), None),
        (
            "PATCH",
            format!("/admin/keys/{id}"),
            Some(json!({"scopes": ["*", "keys:admin"]})),
        ),
        ("POST", format!("/admin/keys/{id}/rotate"), None),
        ("POST", format!("/admin/keys/{id}/revoke"), None),
        ("DELETE", format!("/admin/keys/{id}"), None),
    ]
}

/// Issue 12, item 1: `*` and `prefix:*` (`keys:*` included) are not management scopes; only
/// the exact names are.
#[tokio::test]
async fn wildcards_never_grant_management_scopes() {
    let env = Env::new().await;
    let (_, victim) = env
        .key(NewKey::new("victim", "bob").scope("keys:admin"))
        .await;
    let (star, _) = env.key(NewKey::new("star", "mallory").scope("*")).await;
    let (keys_star, _) = env
        .key(NewKey::new("keys star", "mallory").scope("keys:*"))
        .await;
    let (both, _) = env
        .key(
            NewKey::new("both", "mallory")
                .scope("*")
                .scope("keys:*")
                .scope("k:*"),
        )
        .await;
    // A `*` key made through the API is no admin either.
    let made = env
        .call(
            &env.admin,
            "POST",
            "/admin/keys",
            Some(json!({"name": "api star", "subject": "mallory", "scopes": ["*"]})),
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.text());
    let api_star = made.json()["key"].as_str().unwrap().to_owned();

    let before = env.view(&victim).await;
    let keys = env.count("mallory").await;
    for caller in [&star, &keys_star, &both, &api_star] {
        for (method, uri, body) in every_route(&victim) {
            let reply = env.call(caller, method, &uri, body).await;
            assert_forbidden(&reply);
            assert!(
                reply.headers["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .contains("error=\"insufficient_scope\""),
                "{method} {uri}"
            );
        }
    }
    assert_eq!(
        env.view(&victim).await,
        before,
        "another subject's key untouched"
    );
    assert_eq!(env.count("mallory").await, keys, "no key was created");

    // The exact name still works, on every route.
    for (method, uri, body) in every_route(&victim) {
        let reply = env.call(&env.admin, method, &uri, body).await;
        assert!(
            reply.status.is_success(),
            "{method} {uri}: {}",
            reply.text()
        );
    }
}

/// Issue 12, item 1: a `keys:self` caller holding `*` does not hold `keys:admin`, so it
/// cannot grant it (or `keys:*`), nor rotate a key that has it.
#[tokio::test]
async fn keys_self_with_a_wildcard_cannot_grant_management_scopes() {
    let env = Env::new().await;
    let (alice, alice_id) = env
        .key(NewKey::new("alice", "alice").scope("keys:self").scope("*"))
        .await;
    let (_, sibling_admin) = env
        .key(NewKey::new("sibling", "alice").scope("keys:admin"))
        .await;

    let keys = env.count("alice").await;
    for scopes in [
        json!(["keys:admin"]),
        json!(["*", "keys:admin"]),
        json!(["keys:*"]),
        json!(["keys:verify"]),
    ] {
        let reply = env
            .call(
                &alice,
                "POST",
                "/admin/keys",
                Some(json!({"name": "n", "scopes": scopes})),
            )
            .await;
        assert_forbidden(&reply);
    }
    assert_eq!(env.count("alice").await, keys, "no key was created");
    refused(
        &env,
        &alice,
        &alice_id,
        vec![
            json!({"scopes": ["keys:admin", "keys:self", "*"]}),
            json!({"scopes": ["keys:*"]}),
        ],
    )
    .await;
    let rotate = env
        .call(
            &alice,
            "POST",
            &format!("/admin/keys/{sibling_admin}/rotate"),
            None,
        )
        .await;
    assert_forbidden(&rotate);

    // What it holds by name it may grant; a `*` key it makes is no manager.
    let made = env
        .call(
            &alice,
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "scopes": ["*", "keys:self"]})),
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.text());
    let star = env
        .call(
            &alice,
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "scopes": ["*"]})),
        )
        .await;
    assert_eq!(star.status, 201, "{}", star.text());
    let star = star.json()["key"].as_str().unwrap().to_owned();
    assert_forbidden(&env.call(&star, "GET", "/admin/keys", None).await);
}

/// Issue 12, item 3: rate limits are compared as they apply (a key's own, else the layer's
/// default), so a `keys:self` caller without a limit of its own is held to the default.
/// (The clock stands still: each key's budget is the default's burst of 100.)
#[tokio::test]
async fn keys_self_cannot_escape_the_default_rate_limit() {
    let env = Env::with(|b| b.default_rate_limit(policy("100/s"))).await;
    let (alice, alice_id) = env
        .key(
            NewKey::new("alice", "alice")
                .scope("keys:self")
                .scope("read"),
        )
        .await;

    let keys = env.count("alice").await;
    for limit in ["1000000/s", "101/s", "100/s,burst=101", "6001/min"] {
        let reply = env
            .call(
                &alice,
                "POST",
                "/admin/keys",
                Some(json!({"name": "n", "rate_limit": limit})),
            )
            .await;
        assert_forbidden(&reply);
    }
    assert_eq!(env.count("alice").await, keys, "no key was created");

    // Its own key, and a sibling under the default, cannot be loosened past it.
    let (_, under_default) = env.key(NewKey::new("sibling", "alice").scope("read")).await;
    for id in [&alice_id, &under_default] {
        refused(
            &env,
            &alice,
            id,
            vec![
                json!({"rate_limit": "1000000/s"}),
                json!({"rate_limit": "101/s"}),
            ],
        )
        .await;
    }
    // A key with its own limit tighter than the default: `null` would loosen it.
    let (_, tight) = env
        .key(
            NewKey::new("tight", "alice")
                .scope("read")
                .rate_limit(policy("1/s")),
        )
        .await;
    refused(&env, &alice, &tight, vec![json!({"rate_limit": null})]).await;

    // A key looser than the caller cannot be rotated into its hands.
    let (_, fast) = env
        .key(
            NewKey::new("fast", "alice")
                .scope("read")
                .rate_limit(policy("1000000/s")),
        )
        .await;
    let before = env.count("alice").await;
    let rotate = env
        .call(&alice, "POST", &format!("/admin/keys/{fast}/rotate"), None)
        .await;
    assert_forbidden(&rotate);
    assert_eq!(env.count("alice").await, before, "no key was created");

    // Within the default is fine; nothing asked inherits the caller's (the default).
    for (body, limit) in [
        (json!({"name": "n"}), Value::Null),
        (json!({"name": "n", "rate_limit": "100/s"}), json!("100/s")),
        (json!({"name": "n", "rate_limit": "5/s"}), json!("5/s")),
    ] {
        let reply = env.call(&alice, "POST", "/admin/keys", Some(body)).await;
        assert_eq!(reply.status, 201, "{}", reply.text());
        assert_eq!(reply.json()["rate_limit"], limit);
    }
    // `null` on a key whose own limit is looser than the default tightens it to the default.
    let (_, loose) = env
        .key(
            NewKey::new("loose", "alice")
                .scope("read")
                .rate_limit(policy("200/s")),
        )
        .await;
    let reply = env
        .call(
            &alice,
            "PATCH",
            &format!("/admin/keys/{loose}"),
            Some(json!({"rate_limit": null})),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.json()["rate_limit"].is_null());
    // A key under the default rotates: its effective limit is the caller's.
    let reply = env
        .call(
            &alice,
            "POST",
            &format!("/admin/keys/{under_default}/rotate"),
            None,
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
}

/// Issue 12, item 7: a store whose next update first lets a concurrent change land (an
/// admin's, through the same real store), between the handler's read and its write.
#[derive(Debug, Default)]
struct Racing {
    inner: MemoryStore,
    concurrent: Mutex<Option<KeyPatch>>,
    /// Applied to the key just before a `get` of it, after letting this many `get`s pass.
    concurrent_get: Mutex<Option<(u32, KeyPatch)>>,
}

#[async_trait::async_trait]
impl KeyStore for Racing {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.inner.insert(record).await
    }
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.find_by_digest(digest).await
    }
    async fn get(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        let due = {
            let mut slot = self.concurrent_get.lock().unwrap();
            match slot.as_mut() {
                Some((0, _)) => slot.take().map(|(_, patch)| patch),
                Some((pass, _)) => {
                    *pass -= 1;
                    None
                }
                None => None,
            }
        };
        if let Some(other) = due {
            // A later version than any the handler could have read, whatever the clock says.
            let current = self.inner.get(id).await?.expect("the raced key exists");
            let later = current.updated_at + Duration::seconds(1);
            self.inner.update(id, &other, later).await?;
        }
        self.inner.get(id).await
    }
    async fn update(
        &self,
        id: Uuid,
        patch: &KeyPatch,
        now: OffsetDateTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let concurrent = self.concurrent.lock().unwrap().take();
        if let Some(other) = concurrent {
            self.inner.update(id, &other, now).await?;
        }
        self.inner.update(id, patch, now).await
    }
    async fn add_digest(
        &self,
        id: Uuid,
        found_by: &Digest,
        new: &Digest,
        secret_id: SecretId,
    ) -> Result<bool, StoreError> {
        self.inner.add_digest(id, found_by, new, secret_id).await
    }
    async fn delete(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.delete(id).await
    }
    async fn list(&self, query: &KeyQuery) -> Result<KeyPage, StoreError> {
        self.inner.list(query).await
    }
    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        self.inner.record_usage(usage).await
    }
    async fn apply_audited(
        &self,
        change: keywarden::store::KeyChange<'_>,
        audit: &keywarden::store::AuditWrite<'_>,
    ) -> Result<keywarden::store::Applied, StoreError> {
        if let keywarden::store::KeyChange::Update { id, now, .. } = change {
            let concurrent = self.concurrent.lock().unwrap().take();
            if let Some(other) = concurrent {
                self.inner.update(id, &other, now).await?;
            }
        }
        self.inner.apply_audited(change, audit).await
    }
}

/// Issue 12, item 7: a `keys:self` PATCH checked against a record an admin has since
/// tightened is a 409 `conflict`, and the admin's change stands.
#[tokio::test]
async fn a_patch_that_lost_a_race_is_a_409_conflict() {
    let store = Arc::new(Racing::default());
    // A clock that stands still: both writes land in the same microsecond.
    let clock = keywarden::clock::ManualClock::new(OffsetDateTime::now_utc());
    let layer = keywarden::ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .clock(Arc::new(clock))
        .collection(keywarden::Collection::new("users"))
        .build()
        .unwrap();
    let manager = Arc::new(KeyManager::for_layer(&layer));
    let api = Router::new()
        .nest("/admin", management_router(manager.clone()))
        .layer(layer);
    let alice = manager
        .create(
            NewKey::new("alice", "alice")
                .scope("keys:self")
                .scope("read")
                .rate_limit(policy("100/min")),
        )
        .await
        .unwrap()
        .key;
    let sibling = manager
        .create(
            NewKey::new("sibling", "alice")
                .scope("read")
                .rate_limit(policy("100/min"))
                .expires_in(ExpiresIn::DAYS_30),
        )
        .await
        .unwrap()
        .record;
    let patch = |body: Value| {
        Request::patch(format!("/admin/keys/{}", sibling.id))
            .header("authorization", format!("Bearer {}", alice.expose()))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };

    // Each is valid against the record alice's PATCH reads; the admin's change lands first.
    let races = [
        (
            json!({"rate_limit": "50/min"}),
            KeyPatch {
                rate_limit: Some(Some(policy("10/min"))),
                ..KeyPatch::default()
            },
        ),
        (
            json!({"expires_at": rfc3339(sibling.expires_at.unwrap() - Duration::days(1))}),
            KeyPatch {
                expires_at: Some(Some(sibling.expires_at.unwrap() - Duration::days(20))),
                ..KeyPatch::default()
            },
        ),
        (
            json!({"scopes": ["read"]}),
            KeyPatch {
                scopes: Some(Vec::new()),
                ..KeyPatch::default()
            },
        ),
    ];
    for (body, admin) in races {
        *store.concurrent.lock().unwrap() = Some(admin);
        let reply = send(&api, patch(body.clone())).await;
        assert_problem(&reply, 409, "conflict");
        assert!(
            store.concurrent.lock().unwrap().is_none(),
            "the race was run"
        );
    }
    let now = store.get(sibling.id).await.unwrap().unwrap();
    assert_eq!(
        now.rate_limit,
        Some(policy("10/min")),
        "the admin's tightening stands"
    );
    assert_eq!(
        now.expires_at,
        Some(sibling.expires_at.unwrap() - Duration::days(20))
    );
    assert!(now.scopes.is_empty());

    // Without a race, the same kind of PATCH (now against the fresh record) goes through.
    let reply = send(&api, patch(json!({"rate_limit": "5/min"}))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["rate_limit"], "5/min");
}

/// A rotation copies the old key: if it changed meanwhile (an admin revoked it, or gave it
/// a scope the `keys:self` caller lacks), the copy is stale. 409 `conflict`, no new key.
#[tokio::test]
async fn a_rotation_that_lost_a_race_is_a_409_and_leaves_no_key() {
    let store = Arc::new(Racing::default());
    let layer = keywarden::ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .clock(Arc::new(keywarden::clock::ManualClock::new(
            OffsetDateTime::now_utc(),
        )))
        .collection(keywarden::Collection::new("users"))
        .build()
        .unwrap();
    let manager = Arc::new(KeyManager::for_layer(&layer));
    let api = Router::new()
        .nest("/admin", management_router(manager.clone()))
        .layer(layer);
    let make = |name: &'static str, scopes: &'static [&'static str]| {
        let manager = manager.clone();
        async move {
            let mut new = NewKey::new(name, "alice");
            new.scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
            manager.create(new).await.unwrap()
        }
    };
    let alice = make("alice", &["keys:self", "read"]).await.key;
    let admin = make("admin", &["keys:admin"]).await.key;
    let sibling = make("sibling", &["read"]).await.record;
    let count = || async { store.list(&KeyQuery::new()).await.unwrap().items.len() };
    let keys = count().await;
    let rotate = |key: &keywarden::key::ApiKey| {
        Request::post(format!("/admin/keys/{}/rotate", sibling.id))
            .header("authorization", format!("Bearer {}", key.expose()))
            .body(Body::empty())
            .unwrap()
    };

    *store.concurrent.lock().unwrap() = Some(KeyPatch {
        scopes: Some(vec!["read".into(), "billing:write".into()]),
        ..KeyPatch::default()
    });
    let reply = send(&api, rotate(&alice)).await;
    assert_problem(&reply, 409, "conflict");
    assert!(!reply.text().contains("kw_"), "{}", reply.text());
    assert_eq!(count().await, keys, "the new key was removed");
    let after = store.get(sibling.id).await.unwrap().unwrap();
    assert_eq!(after.expires_at, None, "the old key got no deadline");

    *store.concurrent.lock().unwrap() = Some(KeyPatch {
        revoked_at: Some(OffsetDateTime::now_utc()),
        ..KeyPatch::default()
    });
    let reply = send(&api, rotate(&admin)).await;
    assert_problem(&reply, 409, "conflict");
    assert_eq!(count().await, keys, "a revoked key is not reissued");
    assert!(
        store.concurrent.lock().unwrap().is_none(),
        "the race was run"
    );
}

/// A `keys:self` rotation is judged on the record the handler read (`may_rotate`): if an
/// admin changes the key before the rotation reads it again (here: gives it a scope the
/// caller lacks), the rotation is a 409 and no key is made, rather than a copy with powers
/// the caller lacks. An admin's rotation copies the key as it is when the rotation reads it.
#[tokio::test]
async fn a_keys_self_rotation_of_a_key_changed_since_it_was_judged_is_a_409() {
    let store = Arc::new(Racing::default());
    let layer = keywarden::ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(ring())
        .collection(keywarden::Collection::new("users"))
        .build()
        .unwrap();
    let manager = Arc::new(KeyManager::for_layer(&layer));
    let api = Router::new()
        .nest("/admin", management_router(manager.clone()))
        .layer(layer);
    let make = |name: &'static str, scopes: &'static [&'static str]| {
        let manager = manager.clone();
        async move {
            let mut new = NewKey::new(name, "alice");
            new.scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
            manager.create(new).await.unwrap()
        }
    };
    let alice = make("alice", &["keys:self", "read"]).await.key;
    let admin = make("admin", &["keys:admin"]).await.key;
    let sibling = make("sibling", &["read"]).await.record;
    let count = || async { store.list(&KeyQuery::new()).await.unwrap().items.len() };
    let keys = count().await;
    let rotate = |key: &keywarden::key::ApiKey| {
        Request::post(format!("/admin/keys/{}/rotate", sibling.id))
            .header("authorization", format!("Bearer {}", key.expose()))
            .body(Body::empty())
            .unwrap()
    };

    // The caller's read of its own key (for its credits) and the handler's read pass; the
    // admin's change lands before the rotation's own read.
    *store.concurrent_get.lock().unwrap() = Some((
        2,
        KeyPatch {
            scopes: Some(vec!["read".into(), "billing:write".into()]),
            ..KeyPatch::default()
        },
    ));
    let reply = send(&api, rotate(&alice)).await;
    assert_problem(&reply, 409, "conflict");
    assert!(
        store.concurrent_get.lock().unwrap().is_none(),
        "the race was run"
    );
    assert_eq!(count().await, keys, "no key was made");

    *store.concurrent_get.lock().unwrap() = Some((
        1,
        KeyPatch {
            description: Some(Some("changed meanwhile".into())),
            ..KeyPatch::default()
        },
    ));
    let reply = send(&api, rotate(&admin)).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert!(
        store.concurrent_get.lock().unwrap().is_none(),
        "the race was run"
    );
    assert_eq!(count().await, keys + 1);
    assert_eq!(reply.json()["description"], "changed meanwhile");
}

/// Issue 20, item 3: the management router nests in an app that has state of its own (it
/// was a `Router<()>`, and this did not compile: E0308).
#[tokio::test]
async fn the_management_router_nests_in_an_app_with_state() {
    #[derive(Clone)]
    struct AppState {
        greeting: &'static str,
    }
    async fn hello(axum::extract::State(state): axum::extract::State<AppState>) -> &'static str {
        state.greeting
    }
    let fx = Fixture::new();
    let manager = Arc::new(KeyManager::for_layer(&fx.layer));
    let app: Router = Router::new()
        .route("/hello", axum::routing::get(hello))
        .nest("/admin", management_router(manager))
        .layer(fx.layer.clone())
        .with_state(AppState { greeting: "hi" });
    let admin = fx
        .key(NewKey::new("admin", "root").scope("keys:admin"))
        .await;
    let bearer = format!("Bearer {}", admin.key.expose());
    for (uri, status) in [("/hello", 200), ("/admin/keys", 200)] {
        let request = Request::get(uri)
            .header("authorization", &bearer)
            .body(Body::empty())
            .unwrap();
        let reply = send(&app, request).await;
        assert_eq!(reply.status, status, "{uri}: {}", reply.text());
    }
    let request = Request::get("/hello")
        .header("authorization", &bearer)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, request).await.text(), "hi");
}

/// Issue 20, item 2: a key filed under a collection the layer does not serve would be refused
/// as `invalid_key` wherever it is used: creating one is a 422 naming `collection`, without
/// repeating the submitted name.
#[tokio::test]
async fn a_collection_the_layer_does_not_serve_is_422() {
    let env = Env::new().await;
    let reply = env
        .call(
            &env.admin.clone(),
            "POST",
            "/admin/keys",
            Some(json!({"name": "k", "collection": "kw_live_pasted"})),
        )
        .await;
    assert_invalid(&reply, &["collection"]);
    assert!(!reply.text().contains("kw_live_pasted"), "{}", reply.text());
    let reply = env
        .call(
            &env.admin.clone(),
            "POST",
            "/admin/keys",
            Some(json!({"name": "k", "collection": "teams"})),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
}
