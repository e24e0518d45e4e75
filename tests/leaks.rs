//! No plaintext key and no secret in logs (TRACE), `Debug` output, responses, or the store.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::Router;
use keywarden::{
    credential::CredentialExtractor, key::KeyFormat, manage::Actor, manage::RevealKey,
    management_router, store::KeyPatch, store::KeyQuery, ApiKeyLayer, KeyManager, KeyStore,
    MemoryStore, NewKey, Secret, SecretRing,
};
use support::{get_with, request, send, Fixture, OLD_SECRET, SECRET};
use time::Duration;
use tower::{Layer, ServiceExt};

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
        |b| b.header("x-stack-api-key").query_param("api_key"),
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
        ("x-stack-api-key", k.clone()),
    ];
    for (name, value) in &forms {
        let reply = get_with(&app, "/whoami", &[(name, value.as_bytes())]).await;
        assert_eq!(reply.status, 200);
        transcript.push_str(&format!("\n{:?}\n{}", reply.headers, reply.text()));
    }
    // The query parameter form (enabled here), and gRPC rejections.
    let reply = get_with(&app, &format!("/whoami?api_key={k}"), &[]).await;
    assert_eq!(reply.status, 200);
    transcript.push_str(&format!("\n{:?}\n{}", reply.headers, reply.text()));
    let reply = get_with(
        &app,
        &format!("/whoami?api_key={k}&api_key={k}"),
        &[("content-type", b"application/grpc")],
    )
    .await;
    assert_eq!(reply.headers["grpc-status"], "3");
    transcript.push_str(&format!("\n{:?}\n{}", reply.headers, reply.text()));
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
        vec![("x-stack-api-key", format!("{k}x").into_bytes())],
        vec![
            ("x-api-key", k.clone().into_bytes()),
            ("x-stack-api-key", tampered.clone()),
        ],
        vec![("authorization", format!("Bearer {k}\t{k}").into_bytes())],
        vec![
            ("authorization", format!("Bearer {k}").into_bytes()),
            ("content-type", b"application/grpc".to_vec()),
            ("x-api-key", tampered.clone()),
        ],
    ];
    for headers in &failures {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let reply = get_with(&app, "/whoami", &headers).await;
        assert!(reply.status.is_client_error() || reply.headers.contains_key("grpc-status"));
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

    // The management API: every response but the two that hand out a new key is clean, and
    // those carry only their own new key. Keys pasted into the wrong place are not echoed.
    let admin = fx
        .key(NewKey::new("admin", "root").scope("keys:admin"))
        .await;
    forbidden.push(admin.key.expose().to_owned());
    let api = Router::new()
        .nest(
            "/admin",
            management_router(Arc::new(KeyManager::for_layer(&fx.layer))),
        )
        .layer(fx.layer.clone());
    let auth = format!("Bearer {}", admin.key.expose());
    let call = |method: &'static str, uri: String, body: Option<String>| {
        let api = api.clone();
        let auth = auth.clone();
        async move {
            let mut builder = http::Request::builder()
                .method(method)
                .uri(uri)
                .header("authorization", auth);
            if body.is_some() {
                builder = builder.header("content-type", "application/json");
            }
            let request = builder
                .body(axum::body::Body::from(body.unwrap_or_default()))
                .unwrap();
            support::Reply::from(api.oneshot(request).await.unwrap()).await
        }
    };
    let created = call(
        "POST",
        "/admin/keys".into(),
        Some(r#"{"name":"via-api","subject":"bob","scopes":["read"]}"#.into()),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let created_key = created.json()["key"].as_str().unwrap().to_owned();
    let created_id = created.json()["id"].as_str().unwrap().to_owned();
    assert_clean(
        "a 201 response",
        &created.text().replace(&created_key, ""),
        &forbidden,
    );
    forbidden.push(created_key.clone());
    let wrong_places = [
        ("GET", format!("/admin/keys/{created_key}"), None),
        (
            "GET",
            format!("/admin/keys?subject=bob&{created_key}=1"),
            None,
        ),
        ("GET", format!("/admin/keys?after={created_key}"), None),
        ("GET", format!("/admin/keys/{created_id}"), None),
        ("GET", "/admin/keys".to_owned(), None),
        (
            "PATCH",
            format!("/admin/keys/{created_id}"),
            Some(format!(r#"{{"{created_key}": 1, "name": 7}}"#)),
        ),
        (
            "PATCH",
            format!("/admin/keys/{created_id}"),
            Some(format!(
                r#"{{"scopes": "{created_key}", "rate_limit": "{created_key}"}}"#
            )),
        ),
        (
            "PATCH",
            format!("/admin/keys/{created_id}"),
            Some(format!(r#"{{"expires_at": "{created_key}"}}"#)),
        ),
        (
            "POST",
            "/admin/keys".to_owned(),
            Some(format!(r#"{{"name": "x", "owner_kind": "{created_key}"}}"#)),
        ),
        (
            "POST",
            "/admin/keys".to_owned(),
            Some(format!(r#"{{"name": "x", "expires_in": "{created_key}"}}"#)),
        ),
        (
            "POST",
            "/admin/keys".to_owned(),
            Some(format!("{{\"name\": \"{created_key}")),
        ),
        (
            "PATCH",
            format!("/admin/keys/{created_id}"),
            Some(r#"{"name": "renamed", "disabled": false}"#.to_owned()),
        ),
    ];
    for (method, uri, body) in wrong_places {
        let reply = call(method, uri.clone(), body).await;
        assert!(
            reply.status != 500 && reply.status != 201,
            "{method} {uri}: {} {}",
            reply.status,
            reply.text()
        );
        transcript.push_str(&format!("\n{:?}\n{}", reply.headers, reply.text()));
    }
    let rotated_via_api = call(
        "POST",
        format!("/admin/keys/{created_id}/rotate"),
        Some(r#"{"grace": "0s"}"#.into()),
    )
    .await;
    assert_eq!(rotated_via_api.status, 201, "{}", rotated_via_api.text());
    let new_key = rotated_via_api.json()["key"].as_str().unwrap().to_owned();
    let new_id = rotated_via_api.json()["id"].as_str().unwrap().to_owned();
    assert_clean(
        "a rotation response",
        &rotated_via_api.text().replace(&new_key, ""),
        &forbidden,
    );
    forbidden.push(new_key);
    for (method, uri) in [
        ("POST", format!("/admin/keys/{new_id}/revoke")),
        ("DELETE", format!("/admin/keys/{new_id}")),
        ("DELETE", format!("/admin/keys/{created_id}")),
        ("GET", format!("/admin/keys/{new_id}")),
    ] {
        let reply = call(method, uri.clone(), None).await;
        assert!(
            reply.status.is_success() || reply.status == 404,
            "{method} {uri}"
        );
        transcript.push_str(&format!("\n{:?}\n{}", reply.headers, reply.text()));
    }
    let reply = get_with(&app, "/whoami", &[("x-api-key", created_key.as_bytes())]).await;
    assert_eq!(reply.code(), "invalid_key", "deleted");
    transcript.push_str(&format!("\n{:?}\n{}", reply.headers, reply.text()));

    // Debug output of every public type that touches a key or secret.
    let headers = {
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", k.parse().unwrap());
        h
    };
    let extractor = CredentialExtractor::new(["users"]);
    let credential = extractor.extract(&headers, None).unwrap().unwrap();
    let page = store.list(&KeyQuery::new()).await.unwrap();
    let principal = fx
        .layer
        .verify(admin.key.expose(), &http::Method::GET)
        .await
        .unwrap();
    let secret = Secret::new(SECRET).unwrap();
    let builder = ApiKeyLayer::builder()
        .store(store.clone())
        .secrets(SecretRing::from_strs(SECRET, Some(OLD_SECRET)).unwrap());
    let format = KeyFormat::default();
    let parsed = format.parse(k.as_bytes()).unwrap();
    let rejection = fx
        .layer
        .verify(std::str::from_utf8(&tampered).unwrap(), &http::Method::GET)
        .await
        .unwrap_err();
    let manage_error = fx.manager.get(uuid::Uuid::nil()).await.unwrap_err();
    let service = fx
        .layer
        .layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        }));
    let debug = [
        format!("{first:?}"),
        format!("{rotated:?}"),
        format!("{:?}", first.key),
        format!("{:?}", first.record),
        format!("{credential:?}"),
        format!("{extractor:?}"),
        format!("{:?}", fx.layer),
        format!("{builder:?}"),
        format!("{service:?}"),
        format!("{:?}", fx.manager),
        format!("{:?}", fx.layer.secrets()),
        format!("{secret:?}"),
        format!("{:?}", secret.id()),
        format!("{:?}", RevealKey::new(&secret)),
        format!("{:?}", fx.layer.secrets().digest(k.as_bytes())),
        format!("{parsed:?}"),
        format!("{principal:?}"),
        format!("{rejection:?}"),
        format!("{manage_error:?}"),
        format!("{:?}", SecretRing::from_strs("short", None).unwrap_err()),
        format!("{page:?}"),
        format!("{store:?}"),
    ]
    .join("\n");
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

/// Every byte a SQL store keeps, as text: the SQLite file with its WAL, or every row of every
/// table in the PostgreSQL schema.
#[cfg(all(feature = "sqlite", feature = "postgres"))]
enum RawStore {
    Sqlite(std::path::PathBuf),
    Postgres(keywarden::PostgresStore, String),
}

#[cfg(all(feature = "sqlite", feature = "postgres"))]
impl RawStore {
    async fn contents(&self) -> String {
        match self {
            RawStore::Sqlite(path) => {
                let mut bytes = Vec::new();
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    if let Ok(more) = std::fs::read(p) {
                        bytes.extend(more);
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            RawStore::Postgres(pg, schema) => {
                let tables: Vec<(String,)> = sqlx::query_as(
                    "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1",
                )
                .bind(schema)
                .fetch_all(pg.pool())
                .await
                .unwrap();
                let mut out = String::new();
                for (table,) in tables {
                    let rows: Vec<(String,)> = sqlx::query_as(&format!(
                        "SELECT row_to_json(t)::text FROM \"{schema}\".\"{table}\" t"
                    ))
                    .fetch_all(pg.pool())
                    .await
                    .unwrap();
                    for (row,) in rows {
                        out.push_str(&row);
                        out.push('\n');
                    }
                }
                out
            }
        }
    }

    async fn finish(self) {
        match self {
            RawStore::Sqlite(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    let _ = std::fs::remove_file(p);
                }
            }
            RawStore::Postgres(pg, schema) => {
                sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .execute(pg.pool())
                    .await
                    .unwrap();
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A lifecycle on SQLite and PostgreSQL with viewable keys on (so an encrypted copy is
/// stored): the raw stored data and the TRACE logs hold no key (not even hex-encoded) and
/// no secret.
#[cfg(all(feature = "sqlite", feature = "postgres"))]
#[tokio::test]
async fn sql_stores_hold_no_plaintext() {
    use keywarden::{PostgresStore, SqliteStore};

    const REVEAL_SECRET: &str = "leak-test-reveal-secret-0123456789abcdef";
    let suffix = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let mut backends: Vec<(&str, Arc<dyn KeyStore>, RawStore)> = Vec::new();
    let path = std::env::temp_dir().join(format!("keywarden-leaks-{suffix}.db"));
    let sqlite = SqliteStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    backends.push(("sqlite", Arc::new(sqlite), RawStore::Sqlite(path)));
    if let Some(url) = support::service_url("KEYWARDEN_TEST_POSTGRES_URL") {
        let schema = format!("kw_leaks_{suffix}");
        let pg = PostgresStore::connect_with_schema(&url, &schema)
            .await
            .unwrap();
        backends.push((
            "postgres",
            Arc::new(pg.clone()),
            RawStore::Postgres(pg, schema),
        ));
    }

    for (name, store, raw) in backends {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);

        let reveal = RevealKey::new(&Secret::new(REVEAL_SECRET).unwrap());
        let old_manager = KeyManager::new(
            store.clone(),
            SecretRing::from_strs(OLD_SECRET, None).unwrap(),
        )
        .with_reveal_key(reveal.clone());
        let layer = ApiKeyLayer::builder()
            .store(store.clone())
            .secrets(SecretRing::from_strs(SECRET, Some(OLD_SECRET)).unwrap())
            .collection(keywarden::Collection::new("users"))
            .build()
            .unwrap();
        let manager = KeyManager::for_layer(&layer).with_reveal_key(reveal);
        let app = support::app().layer(layer.clone());

        // Made under the previous secret, migrated on first use.
        let a = old_manager
            .create(
                NewKey::new("a", "alice")
                    .metadata(serde_json::json!({"team": "x"}))
                    .description("first key"),
            )
            .await
            .unwrap();
        let ka = a.key.expose().to_owned();
        for (header, value) in [
            ("x-api-key", ka.clone()),
            ("authorization", format!("Bearer {ka}")),
            ("authorization", format!("users API-Key {ka}")),
        ] {
            let reply = get_with(&app, "/whoami", &[(header, value.as_bytes())]).await;
            assert_eq!(reply.status, 200, "{name}");
        }
        let mut tampered = ka.clone().into_bytes();
        tampered[30] = if tampered[30] == b'a' { b'b' } else { b'a' };
        let reply = get_with(&app, "/whoami", &[("x-api-key", &tampered)]).await;
        assert_eq!(reply.code(), "malformed_key", "{name}");
        assert_eq!(
            manager.reveal(a.record.id, &Actor::Cli).await.unwrap(),
            a.key,
            "{name}"
        );

        let b = manager
            .rotate(a.record.id, Duration::hours(1))
            .await
            .unwrap();
        manager
            .update(
                b.record.id,
                KeyPatch {
                    name: Some("b".into()),
                    ..KeyPatch::default()
                },
            )
            .await
            .unwrap();
        let reply = get_with(&app, "/whoami", &[("x-api-key", b.key.expose().as_bytes())]).await;
        assert_eq!(reply.status, 200, "{name}");
        manager.revoke(b.record.id).await.unwrap();
        let reply = get_with(&app, "/whoami", &[("x-api-key", b.key.expose().as_bytes())]).await;
        assert_eq!(reply.code(), "revoked_key", "{name}");
        let c = manager.create(NewKey::new("c", "carol")).await.unwrap();
        manager.delete(c.record.id).await.unwrap();
        layer.flush_usage().await.unwrap();

        let contents = raw.contents().await;
        assert!(
            contents.contains(&a.record.display_start),
            "{name}: the scan sees the rows"
        );
        let mut forbidden = vec![
            SECRET.to_owned(),
            OLD_SECRET.to_owned(),
            REVEAL_SECRET.to_owned(),
            hex(SECRET.as_bytes()),
            hex(OLD_SECRET.as_bytes()),
            hex(REVEAL_SECRET.as_bytes()),
        ];
        for key in [&a.key, &b.key, &c.key] {
            // The body after `kw_live_`: the stored display hint is its first 4 characters.
            let body = &key.expose()["kw_live_".len()..];
            forbidden.push(body.to_owned());
            forbidden.push(hex(body.as_bytes()));
        }
        assert_clean(&format!("{name} raw data"), &contents, &forbidden);
        assert_clean(&format!("{name} Debug"), &format!("{store:?}"), &forbidden);
        drop(guard);
        let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("re-digested key"), "{name}: {logs}");
        assert_clean(&format!("{name} logs"), &logs, &forbidden);
        raw.finish().await;
    }
}
