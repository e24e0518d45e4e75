//! Verifying Strapi API tokens from Strapi's own `strapi_api_tokens` table.
//!
//! The example creates a SQLite database laid out as Strapi 5 lays out its API-token tables
//! (dates as integer milliseconds, as Strapi stores them in SQLite), seeds full-access,
//! read-only, custom and expired tokens whose `access_key` is computed by keywarden's
//! [`StrapiScheme`], then calls routes behind the layer, each authorized per Strapi action
//! with [`StrapiContentApi`] (`GET` → `find`, `POST` → `create`, as Strapi's content API
//! checks them): reads, writes, an expired token. `--serve` keeps the server up on 127.0.0.1:3000.
//!
//! Run: `cargo run --example strapi_compat --features interop`

use std::sync::Arc;

use axum::body::Body;
use axum::routing::get;
use axum::{Json, Router};
use http::Request;
use keywarden::{
    interop::StrapiContentApi, interop::StrapiScheme, interop::StrapiStore, interop::StrapiTables,
    ApiKeyLayer, Collection, Principal,
};
use tower::ServiceExt;

const API_TOKEN_SALT: &str = "example-salt-from-API_TOKEN_SALT";

fn token(unit: &str) -> String {
    unit.repeat(256 / unit.len())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join(format!("keywarden-strapi-{}.db", std::process::id()));
    let url = format!("sqlite://{}", path.display());
    seed(&format!("{url}?mode=rwc")).await?;

    let store = StrapiStore::connect(&url, StrapiTables::new()).await?;
    let layer = ApiKeyLayer::builder()
        .collection(Collection::foreign(
            "strapi",
            StrapiScheme::new(API_TOKEN_SALT)?,
            Arc::new(store),
        ))
        .build()?;
    // Every route requires its own Strapi action: GET /api/articles `find`, POST `create`.
    let actions = StrapiContentApi::new("/api").collection_type("articles", "api::article.article");
    let app = Router::new()
        .route(
            "/api/articles",
            get(|p: Principal| async move { Json(p) }).post(|p: Principal| async move { Json(p) }),
        )
        .route_layer(actions.layer())
        .layer(layer);

    for (what, method, unit) in [
        ("full-access GET", "GET", "0a"),
        ("read-only GET", "GET", "1b"),
        ("read-only POST", "POST", "1b"),
        ("custom (article find) GET", "GET", "2c"),
        ("custom (article find) POST: needs create", "POST", "2c"),
        ("custom (tag find only) GET", "GET", "3d"),
        ("expired", "GET", "4e"),
    ] {
        let request = Request::builder()
            .method(method)
            .uri("/api/articles")
            .header("authorization", format!("bearer {}", token(unit)))
            .body(Body::empty())?;
        let response = app.clone().oneshot(request).await?;
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024).await?;
        println!("{what}: {status}\n  {}", String::from_utf8_lossy(&body));
    }

    if std::env::args().any(|a| a == "--serve") {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
        println!("\nserving on http://127.0.0.1:3000; try:");
        println!(
            "  curl -H 'Authorization: Bearer {}' http://127.0.0.1:3000/api/articles",
            token("1b")
        );
        axum::serve(listener, app).await?;
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Creates Strapi 5's token tables and five tokens, hashes computed by our own scheme.
async fn seed(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let pool = sqlx::SqlitePool::connect(url).await?;
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS strapi_api_tokens;
         DROP TABLE IF EXISTS strapi_api_token_permissions;
         DROP TABLE IF EXISTS strapi_api_token_permissions_token_lnk;
         CREATE TABLE strapi_api_tokens (id integer PRIMARY KEY AUTOINCREMENT NOT NULL,
           document_id varchar(255), name varchar(255), description varchar(255),
           type varchar(255), access_key varchar(255), encrypted_key text,
           last_used_at datetime, expires_at datetime, lifespan bigint, created_at datetime,
           updated_at datetime, published_at datetime, created_by_id integer,
           updated_by_id integer, locale varchar(255));
         CREATE TABLE strapi_api_token_permissions (id integer PRIMARY KEY AUTOINCREMENT NOT NULL,
           document_id varchar(255), action varchar(255), created_at datetime, updated_at datetime);
         CREATE TABLE strapi_api_token_permissions_token_lnk (id integer PRIMARY KEY AUTOINCREMENT NOT NULL,
           api_token_permission_id integer, api_token_id integer, api_token_permission_ord float);",
    )
    .execute(&pool)
    .await?;
    let scheme = StrapiScheme::new(API_TOKEN_SALT)?;
    let now_ms = i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)?;
    let tokens = [
        (1, "deploy bot", "full-access", "0a", None),
        (2, "website", "read-only", "1b", None),
        (3, "article reader", "custom", "2c", None),
        (4, "tag reader", "custom", "3d", None),
        (
            5,
            "old script",
            "full-access",
            "4e",
            Some(now_ms - 86_400_000),
        ),
    ];
    for (id, name, kind, unit, expires_at) in tokens {
        let access_key = scheme.digests(token(unit).as_bytes())[0]
            .as_str()
            .to_owned();
        sqlx::query(
            "INSERT INTO strapi_api_tokens (id, name, description, type, access_key, expires_at, created_at, updated_at)
             VALUES (?, ?, '', ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(name)
        .bind(kind)
        .bind(access_key)
        .bind(expires_at)
        .bind(now_ms)
        .bind(now_ms)
        .execute(&pool)
        .await?;
    }
    for (id, action, token_id) in [
        (1, "api::article.article.find", 3),
        (2, "api::tag.tag.find", 4),
    ] {
        sqlx::query("INSERT INTO strapi_api_token_permissions (id, action) VALUES (?, ?)")
            .bind(id)
            .bind(action)
            .execute(&pool)
            .await?;
        sqlx::query(
            "INSERT INTO strapi_api_token_permissions_token_lnk (api_token_permission_id, api_token_id) VALUES (?, ?)",
        )
        .bind(id)
        .bind(token_id)
        .execute(&pool)
        .await?;
    }
    pool.close().await;
    Ok(())
}
