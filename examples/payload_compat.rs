//! Verifying Payload CMS API keys from Payload's own users table.
//!
//! The example creates a SQLite database laid out as `@payloadcms/db-sqlite` lays out an auth
//! collection with `useAPIKey` and `verify`, seeds it with users whose `api_key_index` is
//! computed by keywarden's [`PayloadScheme`] (one HMAC-SHA1 row as Payload 2.x–3.46 wrote, one
//! HMAC-SHA256 row as 3.47+ writes, one disabled key), then serves a route behind the layer
//! and calls it through every case. `--serve` keeps the server up on 127.0.0.1:3000.
//!
//! Run: `cargo run --example payload_compat --features interop`

use axum::body::Body;
use axum::routing::get;
use axum::{Json, Router};
use http::Request;
use keywarden::{
    interop::PayloadHash, interop::PayloadScheme, interop::PayloadStore, interop::PayloadTable,
    ApiKeyLayer, Principal,
};
use tower::ServiceExt;

const PAYLOAD_SECRET: &str = "example-payload-secret-from-PAYLOAD_SECRET";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join(format!("keywarden-payload-{}.db", std::process::id()));
    let url = format!("sqlite://{}", path.display());
    seed(&format!("{url}?mode=rwc")).await?;

    // Verify against Payload's table, read-only, exactly as Payload 3.47–3.90 does.
    // The slug is stated once: the table (`users`) is derived from it as Payload's SQL adapters
    // derive it, and its columns are read here (the `enable_a_p_i_key` flag of Payload 3).
    let store = PayloadStore::connect(&url, PayloadTable::from_slug("users").verify(true)).await?;
    let scheme = PayloadScheme::new(PAYLOAD_SECRET)?.hash(PayloadHash::Both);
    let layer = ApiKeyLayer::builder()
        .collection(store.into_collection(scheme))
        .build()?;
    let app = Router::new()
        .route("/whoami", get(|p: Principal| async move { Json(p) }))
        .layer(layer);

    for (what, header) in [
        (
            "HMAC-SHA1 row (Payload 3.0–3.46)",
            "users API-Key 8d5e1f1c-2a7b-4c3d-9e8f-0a1b2c3d4e5f",
        ),
        (
            "HMAC-SHA256 row (Payload 3.47+)",
            "users API-Key 3f2b8c9d-1e4a-4b5c-8d7e-6f5a4b3c2d1e",
        ),
        (
            "enable_a_p_i_key false",
            "users API-Key 11111111-2222-4333-8444-555555555555",
        ),
        (
            "lowercase api-key (Payload ignores it)",
            "users api-key 3f2b8c9d-1e4a-4b5c-8d7e-6f5a4b3c2d1e",
        ),
        (
            "unknown key",
            "users API-Key 00000000-0000-4000-8000-000000000000",
        ),
    ] {
        let request = Request::get("/whoami")
            .header("authorization", header)
            .body(Body::empty())?;
        let response = app.clone().oneshot(request).await?;
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024).await?;
        println!("{what}: {status}\n  {}", String::from_utf8_lossy(&body));
    }

    if std::env::args().any(|a| a == "--serve") {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
        println!("\nserving on http://127.0.0.1:3000; try:");
        println!("  curl -H 'Authorization: users API-Key 3f2b8c9d-1e4a-4b5c-8d7e-6f5a4b3c2d1e' http://127.0.0.1:3000/whoami");
        axum::serve(listener, app).await?;
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Creates Payload's `users` table and three users, indexes computed by our own scheme.
async fn seed(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let pool = sqlx::SqlitePool::connect(url).await?;
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS users;
         CREATE TABLE users (
           id integer PRIMARY KEY NOT NULL,
           name text,
           updated_at text DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) NOT NULL,
           created_at text DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) NOT NULL,
           enable_a_p_i_key integer,
           api_key text,
           api_key_index text,
           email text NOT NULL,
           salt text,
           hash text,
           _verified integer);",
    )
    .execute(&pool)
    .await?;
    let index = |hash: PayloadHash, key: &str| -> Result<String, Box<dyn std::error::Error>> {
        let scheme = PayloadScheme::new(PAYLOAD_SECRET)?.hash(hash);
        Ok(scheme.digests(key.as_bytes())[0].as_str().to_owned())
    };
    let users = [
        (
            1,
            "Ada",
            "8d5e1f1c-2a7b-4c3d-9e8f-0a1b2c3d4e5f",
            PayloadHash::Sha1,
            true,
        ),
        (
            2,
            "Grace",
            "3f2b8c9d-1e4a-4b5c-8d7e-6f5a4b3c2d1e",
            PayloadHash::Sha256,
            true,
        ),
        (
            3,
            "Edsger",
            "11111111-2222-4333-8444-555555555555",
            PayloadHash::Sha256,
            false,
        ),
    ];
    for (id, name, key, hash, enabled) in users {
        sqlx::query(
            "INSERT INTO users (id, name, email, enable_a_p_i_key, api_key, api_key_index, salt, hash, _verified)
             VALUES (?, ?, ?, ?, 'encrypted-by-payload', ?, 'salt', 'hash', 1)",
        )
        .bind(id)
        .bind(name)
        .bind(format!("{}@example.com", name.to_lowercase()))
        .bind(enabled)
        .bind(index(hash, key)?)
        .execute(&pool)
        .await?;
    }
    pool.close().await;
    Ok(())
}
