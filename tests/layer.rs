//! The layer through an axum Router with `oneshot`: every header form, every rejection the
//! layer produces, both modes, collection binding, expiry, revocation, read-only, scopes,
//! identity mapping, header protection and secret rotation.

mod support;

use std::sync::Arc;

use axum::routing::get;
use axum::{Extension, Router};
use keywarden::{
    store::KeyPatch, ApiKeyLayer, Collection, ExpiresIn, KeyManager, KeyStore, MemoryStore, Mode,
    NewKey, OwnerKind, Principal, SecretRing,
};
use support::{get_with, request, ring, send, Fixture, OLD_SECRET, SECRET};
use time::Duration;

#[tokio::test]
async fn every_header_form_authenticates() {
    let fx = Fixture::with(|b| b.header("x-stack-api-key").query_param("api_key"));
    let created = fx.key(NewKey::new("k", "alice").collection("teams")).await;
    let key = created.key.expose();
    let app = fx.app();
    let forms: Vec<(String, Vec<(&str, String)>)> = vec![
        (
            "/whoami".into(),
            vec![("authorization", format!("teams API-Key {key}"))],
        ),
        (
            "/whoami".into(),
            vec![("authorization", format!("teams api-key {key}"))],
        ),
        (
            "/whoami".into(),
            vec![("authorization", format!("Bearer {key}"))],
        ),
        (
            "/whoami".into(),
            vec![("authorization", format!("bearer {key}"))],
        ),
        ("/whoami".into(), vec![("x-api-key", key.to_owned())]),
        ("/whoami".into(), vec![("x-stack-api-key", key.to_owned())]),
        (format!("/whoami?api_key={key}"), vec![]),
        (
            "/whoami".into(),
            vec![
                ("authorization", format!("Bearer {key}")),
                ("x-api-key", key.to_owned()),
            ],
        ),
    ];
    for (uri, headers) in forms {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        let reply = get_with(&app, &uri, &headers).await;
        assert_eq!(
            reply.status,
            200,
            "{uri} {:?}: {}",
            headers.iter().map(|h| h.0).collect::<Vec<_>>(),
            reply.text()
        );
        let json = reply.json();
        assert_eq!(json["subject"], "alice");
        assert_eq!(json["collection"], "teams");
        assert_eq!(json["key_id"], created.record.id.to_string());
        assert_eq!(json["environment"], "live");
    }
}

#[tokio::test]
async fn missing_and_malformed_credentials() {
    let fx = Fixture::new();
    let key = fx.key(NewKey::new("k", "alice")).await.key;
    let app = fx.app();

    let reply = get_with(&app, "/whoami", &[]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.code().as_str()),
        (401, "missing_credentials")
    );
    assert_eq!(reply.headers["www-authenticate"], "Bearer realm=\"api\"");

    // A foreign scheme is not a credential.
    let reply = get_with(&app, "/whoami", &[("authorization", b"Basic dXNlcjpwYXNz")]).await;
    assert_eq!(reply.code(), "missing_credentials");

    let mut tampered = key.expose().as_bytes().to_vec();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let malformed: Vec<Vec<u8>> = vec![
        tampered,
        b"kw_live_short".to_vec(),
        b"sk_live_4eC39HqLyjWDarjtT1zdp7dc".to_vec(),
        b"eyJhbGciOiJIUzI1NiJ9.e30.sig".to_vec(),
        key.expose().as_bytes()[..key.expose().len() - 1].to_vec(),
        b"kw_live_\xc3\xa9".to_vec(),
        vec![b'a'; 600],
    ];
    for value in malformed {
        let reply = get_with(&app, "/whoami", &[("x-api-key", &value)]).await;
        assert_eq!(reply.status, 401);
        assert_eq!(
            reply.code(),
            "malformed_key",
            "{}",
            String::from_utf8_lossy(&value)
        );
        let challenge = reply.headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    }
    // The detail names the defect, for whoever pasted the key.
    let key = key.expose().as_bytes();
    let mut typo = key.to_vec();
    typo[key.len() - 1] = if typo[key.len() - 1] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let mut bad_char = key.to_vec();
    bad_char[10] = b'-';
    for (value, detail) in [
        (
            typo,
            "the key's checksum does not match (typo or truncated key?)",
        ),
        (bad_char, "the key contains an invalid character"),
        (
            key[..key.len() - 1].to_vec(),
            "the key has the wrong length",
        ),
        (
            b"sk_live_4eC39HqLyjWDarjtT1zdp7dc".to_vec(),
            "the key does not have a recognised prefix",
        ),
    ] {
        let reply = get_with(&app, "/whoami", &[("x-api-key", &value)]).await;
        assert_eq!(reply.code(), "malformed_key");
        assert_eq!(reply.json()["detail"], detail);
    }
    for value in [&b"Bearer"[..], b"users API-Key", b"Bearer two words"] {
        let reply = get_with(&app, "/whoami", &[("authorization", value)]).await;
        assert_eq!(
            reply.code(),
            "malformed_key",
            "{}",
            String::from_utf8_lossy(value)
        );
    }
}

#[tokio::test]
async fn unknown_keys_slugs_and_wrong_collections_are_invalid() {
    let fx = Fixture::new();
    let user_key = fx.key(NewKey::new("k", "alice")).await.key;
    let unknown = keywarden::key::KeyPrefix::new("kw_live")
        .unwrap()
        .generate();
    let app = fx.app();

    let reply = get_with(
        &app,
        "/whoami",
        &[("x-api-key", unknown.expose().as_bytes())],
    )
    .await;
    assert_eq!(reply.code(), "invalid_key");

    let value = format!("admins API-Key {}", user_key.expose());
    let reply = get_with(&app, "/whoami", &[("authorization", value.as_bytes())]).await;
    assert_eq!(reply.code(), "invalid_key", "unknown slug");

    let value = format!("teams API-Key {}", user_key.expose());
    let reply = get_with(&app, "/whoami", &[("authorization", value.as_bytes())]).await;
    assert_eq!(
        reply.code(),
        "invalid_key",
        "a users key presented as a teams key"
    );

    // A key of a collection this layer does not serve is invalid through any form. (The
    // layer's own manager refuses to make one; a manager without layers, as the CLI's, can.)
    let other = KeyManager::new(fx.layer.store().clone(), ring())
        .create(NewKey::new("k", "bot").collection("robots"))
        .await
        .unwrap()
        .key;
    let reply = get_with(&app, "/whoami", &[("x-api-key", other.expose().as_bytes())]).await;
    assert_eq!(reply.code(), "invalid_key");
}

#[tokio::test]
async fn ambiguous_credentials() {
    let fx = Fixture::new();
    let a = fx.key(NewKey::new("a", "alice")).await.key;
    let b = fx.key(NewKey::new("b", "bob")).await.key;
    let app = fx.app();
    let bearer_a = format!("Bearer {}", a.expose());
    let cases: Vec<Vec<(&str, &[u8])>> = vec![
        vec![
            ("authorization", bearer_a.as_bytes()),
            ("x-api-key", b.expose().as_bytes()),
        ],
        vec![
            ("authorization", bearer_a.as_bytes()),
            ("authorization", bearer_a.as_bytes()),
        ],
        vec![
            ("x-api-key", a.expose().as_bytes()),
            ("x-api-key", a.expose().as_bytes()),
        ],
    ];
    for headers in cases {
        let reply = get_with(&app, "/whoami", &headers).await;
        assert_eq!(reply.status, 400);
        assert_eq!(reply.code(), "ambiguous_credentials");
        assert!(reply.headers.get("www-authenticate").is_none());
    }
}

#[tokio::test]
async fn expiry_is_judged_by_the_clock_at_request_time() {
    let fx = Fixture::new();
    let key = fx
        .key(NewKey::new("k", "alice").expires_in(ExpiresIn::DAYS_7))
        .await
        .key;
    let app = fx.app();
    let header = [("x-api-key", key.expose().as_bytes())];
    assert_eq!(get_with(&app, "/whoami", &header).await.status, 200);
    // The entry is cached now; moving the clock must still expire it.
    fx.clock.advance(Duration::days(7) - Duration::seconds(1));
    assert_eq!(get_with(&app, "/whoami", &header).await.status, 200);
    fx.clock.advance(Duration::seconds(1));
    let reply = get_with(&app, "/whoami", &header).await;
    assert_eq!(reply.code(), "expired_key");
    assert!(reply.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
}

#[tokio::test]
async fn revocation_and_disabling_take_effect_immediately() {
    let fx = Fixture::new();
    let created = fx.key(NewKey::new("k", "alice")).await;
    let app = fx.app();
    let header = [("x-api-key", created.key.expose().as_bytes())];
    assert_eq!(get_with(&app, "/whoami", &header).await.status, 200);

    fx.manager
        .update(
            created.record.id,
            KeyPatch {
                disabled: Some(true),
                ..KeyPatch::default()
            },
        )
        .await
        .unwrap();
    let reply = get_with(&app, "/whoami", &header).await;
    assert_eq!(reply.code(), "revoked_key");
    assert!(reply.json()["detail"]
        .as_str()
        .unwrap()
        .contains("disabled"));

    fx.manager
        .update(
            created.record.id,
            KeyPatch {
                disabled: Some(false),
                ..KeyPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(get_with(&app, "/whoami", &header).await.status, 200);

    fx.manager.revoke(created.record.id).await.unwrap();
    assert_eq!(
        get_with(&app, "/whoami", &header).await.code(),
        "revoked_key"
    );

    fx.manager.delete(created.record.id).await.unwrap();
    assert_eq!(
        get_with(&app, "/whoami", &header).await.code(),
        "invalid_key"
    );
}

#[tokio::test]
async fn rotation_keeps_the_old_key_until_the_grace_deadline() {
    let fx = Fixture::new();
    let old = fx.key(NewKey::new("k", "alice")).await;
    let app = fx.app();
    let old_header = [("x-api-key", old.key.expose().as_bytes())];
    assert_eq!(get_with(&app, "/whoami", &old_header).await.status, 200);
    let new = fx
        .manager
        .rotate(old.record.id, Duration::hours(24))
        .await
        .unwrap();
    let new_header = [("x-api-key", new.key.expose().as_bytes())];
    assert_eq!(get_with(&app, "/whoami", &old_header).await.status, 200);
    assert_eq!(get_with(&app, "/whoami", &new_header).await.status, 200);
    fx.clock.advance(Duration::hours(24));
    assert_eq!(
        get_with(&app, "/whoami", &old_header).await.code(),
        "expired_key"
    );
    assert_eq!(get_with(&app, "/whoami", &new_header).await.status, 200);
}

#[tokio::test]
async fn read_only_keys_only_use_safe_methods() {
    let fx = Fixture::new();
    let key = fx.key(NewKey::new("k", "alice").read_only(true)).await.key;
    let app = fx.app();
    let header = [("x-api-key", key.expose().as_bytes())];
    assert_eq!(get_with(&app, "/whoami", &header).await.status, 200);
    let reply = send(&app, request("POST", "/write", &header)).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.code(), "insufficient_scope");
    assert!(reply.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("insufficient_scope"));

    let writer = fx.key(NewKey::new("w", "bob")).await.key;
    let reply = send(
        &app,
        request(
            "POST",
            "/write",
            &[("x-api-key", writer.expose().as_bytes())],
        ),
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn scopes_are_enforced_per_route() {
    let fx = Fixture::new();
    let plain = fx.key(NewKey::new("p", "alice").scope("read")).await.key;
    let admin = fx.key(NewKey::new("a", "root").scope("admin")).await.key;
    let star = fx.key(NewKey::new("s", "ops").scope("*")).await.key;
    let app = fx.app();

    let reply = get_with(&app, "/admin", &[("x-api-key", plain.expose().as_bytes())]).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.code(), "insufficient_scope");
    assert!(reply.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("scope=\"admin\""));
    for key in [&admin, &star] {
        let reply = get_with(&app, "/admin", &[("x-api-key", key.expose().as_bytes())]).await;
        assert_eq!(reply.status, 200);
    }

    // Without the API-key layer in front, the scope layer fails closed.
    let bare = support::app();
    assert_eq!(
        get_with(&bare, "/admin", &[]).await.code(),
        "missing_credentials"
    );
}

#[tokio::test]
async fn optional_mode_passes_anonymous_requests_but_rejects_bad_keys() {
    let fx = Fixture::with(|b| b.mode(Mode::Optional));
    let key = fx.key(NewKey::new("k", "alice")).await.key;
    let app = fx.app();
    assert_eq!(get_with(&app, "/maybe", &[]).await.text(), "anonymous");
    let reply = get_with(&app, "/maybe", &[("x-api-key", key.expose().as_bytes())]).await;
    assert_eq!(reply.text(), "alice");
    // A foreign bearer token is left for another layer: no principal, no rejection.
    let reply = get_with(
        &app,
        "/maybe",
        &[("authorization", b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig")],
    )
    .await;
    assert_eq!(
        (reply.status.as_u16(), reply.text().as_str()),
        (200, "anonymous")
    );
    // ...but a token in our format that is bad is still rejected.
    let reply = get_with(
        &app,
        "/maybe",
        &[("authorization", b"Bearer kw_live_short")],
    )
    .await;
    assert_eq!(reply.code(), "malformed_key");
    let unknown = keywarden::key::KeyPrefix::new("kw_test")
        .unwrap()
        .generate();
    let reply = get_with(
        &app,
        "/maybe",
        &[("x-api-key", unknown.expose().as_bytes())],
    )
    .await;
    assert_eq!(reply.code(), "invalid_key");
    // A handler that requires a principal still refuses anonymous requests.
    assert_eq!(
        get_with(&app, "/whoami", &[]).await.code(),
        "missing_credentials"
    );
}

#[derive(Clone, Debug, PartialEq)]
struct CurrentUser {
    id: String,
    is_admin: bool,
}

#[tokio::test]
async fn identity_mapping_lets_existing_handlers_run_unchanged() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let fx = Fixture::with(move |b| {
        b.map_identity(move |p: &Principal| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            CurrentUser {
                id: p.subject().to_owned(),
                is_admin: p.has_scope("admin"),
            }
        })
    });
    let key = fx.key(NewKey::new("k", "alice").scope("admin")).await.key;
    // An existing handler that knows nothing of keywarden.
    let app = Router::new()
        .route(
            "/me",
            get(|Extension(user): Extension<CurrentUser>| async move {
                format!("{} admin={}", user.id, user.is_admin)
            }),
        )
        .layer(fx.layer.clone());
    for _ in 0..5 {
        let reply = get_with(&app, "/me", &[("x-api-key", key.expose().as_bytes())]).await;
        assert_eq!(reply.text(), "alice admin=true");
    }
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "mapped once, then cached"
    );
}

#[tokio::test]
async fn credential_headers_are_marked_sensitive_or_stripped() {
    async fn inspect(req: http::Request<axum::body::Body>) -> String {
        let h = req.headers();
        format!(
            "auth={:?} sensitive={} x={:?}",
            h.get("authorization").map(|v| v.is_sensitive()),
            h.get("x-api-key").is_some_and(|v| v.is_sensitive()),
            h.get("x-api-key").is_some()
        )
    }
    for strip in [false, true] {
        let fx = Fixture::with(|b| b.strip_credentials(strip));
        let key = fx.key(NewKey::new("k", "alice")).await.key;
        let app = Router::new()
            .route("/", get(inspect))
            .layer(fx.layer.clone());
        let bearer = format!("Bearer {}", key.expose());
        let reply = get_with(&app, "/", &[("authorization", bearer.as_bytes())]).await;
        let expected = if strip {
            "auth=None"
        } else {
            "auth=Some(true)"
        };
        assert!(
            reply.text().starts_with(expected),
            "strip={strip}: {}",
            reply.text()
        );
        let expected = if strip {
            "sensitive=false x=false"
        } else {
            "sensitive=true x=true"
        };
        // A small request is marked in the pass that finds the key, a large one (more
        // header values than that pass reads) at admission: the same either way.
        let padding: Vec<(String, &[u8])> =
            (0..40).map(|i| (format!("x-pad-{i}"), &b"v"[..])).collect();
        for pad in [0, 40] {
            let mut headers: Vec<(&str, &[u8])> = padding[..pad]
                .iter()
                .map(|(n, v)| (n.as_str(), *v))
                .collect();
            headers.push(("x-api-key", key.expose().as_bytes()));
            let reply = get_with(&app, "/", &headers).await;
            assert!(
                reply.text().ends_with(expected),
                "strip={strip} padding={pad}: {}",
                reply.text()
            );
        }
    }
}

/// Only the headers that carried the credential are touched, and every one that did is: with two
/// key headers configured, a key in one, the other, or all three places.
#[tokio::test]
async fn every_credential_header_and_only_those_are_protected() {
    async fn inspect(req: http::Request<axum::body::Body>) -> String {
        let h = req.headers();
        let state = |name: &str| match h.get(name) {
            None => "absent",
            Some(v) if v.is_sensitive() => "sensitive",
            Some(_) => "plain",
        };
        format!(
            "auth={} x={} y={} other={}",
            state("authorization"),
            state("x-api-key"),
            state("x-other-key"),
            state("x-unrelated")
        )
    }
    for strip in [false, true] {
        let fx = Fixture::with(|b| b.header("x-other-key").strip_credentials(strip));
        let key = fx.key(NewKey::new("k", "alice")).await.key;
        let app = Router::new()
            .route("/", get(inspect))
            .layer(fx.layer.clone());
        let bearer = format!("Bearer {}", key.expose());
        let k = key.expose().as_bytes();
        let carried = if strip { "absent" } else { "sensitive" };
        type Headers<'a> = &'a [(&'a str, &'a [u8])];
        let cases: [(Headers, String); 3] = [
            (
                &[("x-other-key", k), ("x-unrelated", b"v")],
                format!("auth=absent x=absent y={carried} other=plain"),
            ),
            (
                &[("x-api-key", k), ("x-unrelated", b"v")],
                format!("auth=absent x={carried} y=absent other=plain"),
            ),
            (
                &[
                    ("authorization", bearer.as_bytes()),
                    ("x-api-key", k),
                    ("x-other-key", k),
                    ("x-unrelated", b"v"),
                ],
                format!("auth={carried} x={carried} y={carried} other=plain"),
            ),
        ];
        for (headers, expected) in cases {
            let reply = get_with(&app, "/", headers).await;
            assert_eq!(reply.status, 200, "strip={strip}: {}", reply.text());
            assert_eq!(reply.text(), expected, "strip={strip}");
        }
    }
}

#[tokio::test]
async fn opaque_collections_accept_foreign_keys() {
    let store = Arc::new(MemoryStore::new());
    let fx = Fixture::with_store(store.clone(), ring(), |b| {
        b.collection(Collection::opaque("legacy"))
    });
    // Import a Payload-style UUID key by storing its digest directly.
    let foreign = "3f0e5a3c-9d2b-4c1e-8f7a-0b1c2d3e4f5a";
    let mut record = fx
        .key(NewKey::new("imported", "carol").collection("legacy"))
        .await
        .record;
    fx.store.delete(record.id).await.unwrap();
    record.digest = ring().digest(foreign.as_bytes());
    record.display_start = "3f0e".into();
    fx.store.insert(&record).await.unwrap();
    let app = fx.app();

    let slug_form = format!("legacy API-Key {foreign}");
    let reply = get_with(&app, "/whoami", &[("authorization", slug_form.as_bytes())]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = get_with(&app, "/whoami", &[("x-api-key", foreign.as_bytes())]).await;
    assert_eq!(
        reply.status, 200,
        "unbound forms accept opaque keys when a collection is opaque"
    );
    // A collection that is not opaque refuses the foreign format before any lookup.
    let users_form = format!("users API-Key {foreign}");
    let reply = get_with(&app, "/whoami", &[("authorization", users_form.as_bytes())]).await;
    assert_eq!(reply.code(), "malformed_key");
}

#[tokio::test]
async fn secret_rotation_invalidates_no_key_and_migrates_digests() {
    let store = Arc::new(MemoryStore::new());
    let before = Fixture::with_store(
        store.clone(),
        SecretRing::from_strs(OLD_SECRET, None).unwrap(),
        |b| b,
    );
    let created = before
        .key(NewKey::new("k", "alice").owner_kind(OwnerKind::Service))
        .await;
    let old_digest = created.record.digest;

    let after = Fixture::with_store(
        store.clone(),
        SecretRing::from_strs(SECRET, Some(OLD_SECRET)).unwrap(),
        |b| b,
    );
    let reply = get_with(
        &after.app(),
        "/whoami",
        &[("x-api-key", created.key.expose().as_bytes())],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["owner_kind"], "service");
    // Re-digested on first use: found under the current secret, the old digest kept valid.
    let new_digest = after
        .layer
        .secrets()
        .digest(created.key.expose().as_bytes());
    assert_ne!(new_digest, old_digest);
    let migrated = store.find_by_digest(&new_digest).await.unwrap().unwrap();
    assert_eq!(migrated.id, created.record.id, "re-digested on first use");
    assert_eq!(
        store
            .find_by_digest(&old_digest)
            .await
            .unwrap()
            .map(|r| r.id),
        Some(created.record.id),
        "the old digest stays valid"
    );

    // With the old secret gone from the ring the key still verifies.
    let only_new = Fixture::with_store(store, SecretRing::from_strs(SECRET, None).unwrap(), |b| b);
    let reply = get_with(
        &only_new.app(),
        "/whoami",
        &[("x-api-key", created.key.expose().as_bytes())],
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn store_failures_are_503_never_500() {
    #[derive(Debug)]
    struct Down;
    #[async_trait::async_trait]
    impl KeyStore for Down {
        async fn insert(
            &self,
            _: &keywarden::store::KeyRecord,
        ) -> Result<(), keywarden::StoreError> {
            Err(down())
        }
        async fn find_by_digest(
            &self,
            _: &keywarden::secret::Digest,
        ) -> Result<Option<keywarden::store::KeyRecord>, keywarden::StoreError> {
            Err(down())
        }
        async fn get(
            &self,
            _: uuid::Uuid,
        ) -> Result<Option<keywarden::store::KeyRecord>, keywarden::StoreError> {
            Err(down())
        }
        async fn update(
            &self,
            _: uuid::Uuid,
            _: &KeyPatch,
            _: time::OffsetDateTime,
        ) -> Result<Option<keywarden::store::KeyRecord>, keywarden::StoreError> {
            Err(down())
        }
        async fn add_digest(
            &self,
            _: uuid::Uuid,
            _: &keywarden::secret::Digest,
            _: &keywarden::secret::Digest,
            _: keywarden::secret::SecretId,
        ) -> Result<bool, keywarden::StoreError> {
            Err(down())
        }
        async fn delete(
            &self,
            _: uuid::Uuid,
        ) -> Result<Option<keywarden::store::KeyRecord>, keywarden::StoreError> {
            Err(down())
        }
        async fn list(
            &self,
            _: &keywarden::store::KeyQuery,
        ) -> Result<keywarden::store::KeyPage, keywarden::StoreError> {
            Err(down())
        }
        async fn record_usage(
            &self,
            _: &[keywarden::store::KeyUsage],
        ) -> Result<(), keywarden::StoreError> {
            Err(down())
        }
    }
    fn down() -> keywarden::StoreError {
        keywarden::StoreError::new(
            keywarden::store::StoreErrorKind::Unavailable,
            "connection refused",
        )
    }
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(Down))
        .secrets(ring())
        .build()
        .unwrap();
    let app = support::app().layer(layer);
    let key = keywarden::key::KeyPrefix::new("kw_live")
        .unwrap()
        .generate();
    let reply = get_with(&app, "/whoami", &[("x-api-key", key.expose().as_bytes())]).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.code(), "store_unavailable");
    assert_eq!(reply.headers["retry-after"], "1");
}

#[tokio::test]
async fn verify_outside_http_and_manager_without_layer() {
    let fx = Fixture::new();
    let key = fx.key(NewKey::new("k", "alice").read_only(true)).await.key;
    let principal = fx
        .layer
        .verify(key.expose(), &http::Method::GET)
        .await
        .unwrap();
    assert_eq!(principal.subject(), "alice");
    let err = fx
        .layer
        .verify(key.expose(), &http::Method::DELETE)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), keywarden::RejectionKind::InsufficientScope);
    let err = fx
        .layer
        .verify("nope", &http::Method::GET)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), keywarden::RejectionKind::MalformedKey);

    // A manager that was not told about the layer cannot invalidate it: the cached entry
    // lives until its TTL. That is why `KeyManager::for_layer` exists.
    let detached = KeyManager::new(fx.layer.store().clone(), ring());
    let other = detached.create(NewKey::new("x", "bob")).await.unwrap();
    assert!(fx
        .layer
        .verify(other.key.expose(), &http::Method::GET)
        .await
        .is_ok());
    assert_eq!(SECRET.len(), 40);
}

#[tokio::test]
async fn not_found_is_cached_briefly_and_cleared_by_creation() {
    let fx = Fixture::new();
    let app = fx.app();
    let created = fx.key(NewKey::new("k", "alice")).await;
    let key = created.key.expose().to_owned();
    fx.manager.delete(created.record.id).await.unwrap();
    let header = [("x-api-key", key.as_bytes())];
    assert_eq!(
        get_with(&app, "/whoami", &header).await.code(),
        "invalid_key"
    );
    // Put the same digest back (as an import would) through the manager's store; the
    // negative entry is dropped when the layer is told.
    fx.store.insert(&created.record).await.unwrap();
    fx.layer.invalidate_digest(&created.record.digest).await;
    assert_eq!(get_with(&app, "/whoami", &header).await.status, 200);
}

#[tokio::test]
async fn opaque_keys_only_reach_opaque_collections() {
    let fx = Fixture::with(|b| b.collection(Collection::opaque("legacy")));
    // A foreign-format key whose record sits in a non-opaque collection (`users`).
    let foreign = "5e1d0c7a-1111-4222-8333-944455556666";
    let mut record = fx.key(NewKey::new("users-key", "dave")).await.record;
    fx.store.delete(record.id).await.unwrap();
    record.digest = ring().digest(foreign.as_bytes());
    fx.store.insert(&record).await.unwrap();
    let app = fx.app();
    let reply = get_with(&app, "/whoami", &[("x-api-key", foreign.as_bytes())]).await;
    assert_eq!(
        reply.code(),
        "invalid_key",
        "users does not accept opaque keys through any form"
    );
    let bearer = format!("Bearer {foreign}");
    let reply = get_with(&app, "/whoami", &[("authorization", bearer.as_bytes())]).await;
    assert_eq!(reply.code(), "invalid_key");

    // A key with our prefix but a bad checksum is malformed even for an opaque collection.
    let good = fx
        .key(NewKey::new("k", "erin").collection("legacy"))
        .await
        .key;
    let mut bad = good.expose().to_owned();
    bad.replace_range(20..21, if &bad[20..21] == "a" { "b" } else { "a" });
    let slug_form = format!("legacy API-Key {bad}");
    let reply = get_with(&app, "/whoami", &[("authorization", slug_form.as_bytes())]).await;
    assert_eq!(reply.code(), "malformed_key");
    let reply = get_with(&app, "/whoami", &[("x-api-key", bad.as_bytes())]).await;
    assert_eq!(reply.code(), "malformed_key");
    // Native keys still work for the opaque collection.
    let slug_form = format!("legacy API-Key {}", good.expose());
    let reply = get_with(&app, "/whoami", &[("authorization", slug_form.as_bytes())]).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn build_rejects_configurations_that_cannot_work() {
    use keywarden::layer::BuildErrorKind;
    let base = || {
        ApiKeyLayer::builder()
            .store(Arc::new(MemoryStore::new()))
            .secrets(ring())
    };
    let kind = |b: keywarden::ApiKeyLayerBuilder| b.build().unwrap_err().kind();
    assert_eq!(
        kind(ApiKeyLayer::builder().secrets(ring())),
        BuildErrorKind::MissingStore
    );
    assert_eq!(
        kind(ApiKeyLayer::builder().store(Arc::new(MemoryStore::new()))),
        BuildErrorKind::MissingSecrets
    );
    assert_eq!(
        kind(base().collection(Collection::new("Bearer"))),
        BuildErrorKind::InvalidCollection
    );
    assert_eq!(
        kind(base().collection(Collection::new("two words"))),
        BuildErrorKind::InvalidCollection
    );
    assert_eq!(
        kind(
            base()
                .collection(Collection::new("users"))
                .collection(Collection::opaque("users"))
        ),
        BuildErrorKind::DuplicateCollection
    );
    assert_eq!(
        kind(base().header("Authorization")),
        BuildErrorKind::InvalidHeaderName
    );
    assert_eq!(
        kind(base().header("bad header")),
        BuildErrorKind::InvalidHeaderName
    );
    assert_eq!(
        kind(base().query_param("a&b")),
        BuildErrorKind::InvalidQueryParam
    );
    assert!(base()
        .header("X-Stack-Api-Key")
        .query_param("api_key")
        .build()
        .is_ok());
}

/// tower's contract: `call` goes to the instance that `poll_ready` readied. `ConcurrencyLimit`
/// panics otherwise, and with a limit of one it also shows that a request still waiting for
/// the store holds the permit it was readied with, not a clone's. Exercised on every path:
/// a miss (boxed), a hit (decided in `call`), a rejection, and two requests in flight.
#[tokio::test]
async fn the_inner_service_that_was_polled_ready_is_the_one_called() {
    use std::convert::Infallible;
    use tower::{Layer, Service, ServiceBuilder, ServiceExt};

    let fx = Fixture::new();
    let created = fx.key(NewKey::new("k", "alice")).await;
    let key = created.key.expose().to_owned();
    let inner = ServiceBuilder::new().concurrency_limit(1).service_fn(
        |_req: http::Request<axum::body::Body>| async {
            Ok::<_, Infallible>(http::Response::new(axum::body::Body::empty()))
        },
    );
    let mut service = fx.layer.layer(inner);
    let with_key = |value: &str| request("GET", "/", &[("x-api-key", value.as_bytes())]);
    let mut malformed = key.clone().into_bytes();
    let last = malformed.last_mut().unwrap();
    *last = if *last == b'A' { b'B' } else { b'A' };
    let malformed = String::from_utf8(malformed).unwrap();

    for (value, status) in [
        (key.as_str(), 200), // miss: the boxed path
        (key.as_str(), 200), // hit: decided in `call`
        (malformed.as_str(), 401),
        (key.as_str(), 200),
    ] {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(with_key(value))
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{value:.12}");
    }

    // Two hits in flight: the second is readied only once the first has finished.
    let first = service.ready().await.unwrap().call(with_key(&key));
    let mut clone = service.clone();
    let second_ready =
        tokio::time::timeout(std::time::Duration::from_millis(50), clone.ready()).await;
    assert!(
        second_ready.is_err(),
        "the permit is held by the first request"
    );
    assert_eq!(first.await.unwrap().status(), 200);
    let second = clone.ready().await.unwrap().call(with_key(&key));
    assert_eq!(second.await.unwrap().status(), 200);
}

/// The service's `Debug` shows the inner service and nothing of the verification state (the
/// secret ring, the cache of keys) behind it.
#[tokio::test]
async fn the_service_debug_shows_the_inner_service_and_nothing_else() {
    use tower::Layer;

    #[derive(Clone, Debug)]
    struct TheApp;

    let service = Fixture::new().layer.layer(TheApp);
    assert_eq!(
        format!("{service:?}"),
        "ApiKeyService { inner: TheApp, .. }"
    );
}

/// A cache hit is decided inside `call`: the inner service is called before the response
/// future is first polled, and nothing is boxed. A miss waits for the store, so it calls the
/// inner service only when its future runs.
#[tokio::test]
async fn a_cache_hit_calls_the_inner_service_inside_call() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{Layer, Service, ServiceExt};

    let fx = Fixture::new();
    let key = fx.key(NewKey::new("k", "alice")).await.key;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let inner = tower::service_fn(move |_req: http::Request<axum::body::Body>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty())) }
    });
    let mut service = fx.layer.layer(inner);
    let with_key = || request("GET", "/", &[("x-api-key", key.expose().as_bytes())]);

    let miss = service.ready().await.unwrap().call(with_key());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a miss is not decided in `call`"
    );
    assert_eq!(miss.await.unwrap().status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let hit = service.ready().await.unwrap().call(with_key());
    assert_eq!(calls.load(Ordering::SeqCst), 2, "a hit is");
    assert_eq!(hit.await.unwrap().status(), 200);
}
