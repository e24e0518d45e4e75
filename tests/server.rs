//! A real axum server on a loopback port, called by a real HTTP client.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use keywarden::{store::KeyPatch, ExpiresIn, NewKey};
use support::Fixture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn serve(fx: &Fixture) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = fx.app();
    let handle = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, handle)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let json: serde_json::Value = response.json().await.unwrap();
    (status, json["code"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn header_forms_and_rejections_over_the_wire() {
    let fx = Fixture::new();
    let created = fx
        .key(
            NewKey::new("k", "alice")
                .collection("services")
                .expires_in(ExpiresIn::DAYS_30),
        )
        .await;
    let key = created.key.expose();
    let (addr, server) = serve(&fx).await;
    let url = format!("http://{addr}/whoami");
    let http = client();

    for (name, value) in [
        ("authorization", format!("services API-Key {key}")),
        ("authorization", format!("Bearer {key}")),
        ("x-api-key", key.to_owned()),
    ] {
        let response = http.get(&url).header(name, value).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let json: serde_json::Value = response.json().await.unwrap();
        assert_eq!(json["subject"], "alice");
        assert_eq!(json["collection"], "services");
        assert!(json["expires_at"].as_str().is_some());
    }

    assert_eq!(
        code(http.get(&url).send().await.unwrap()).await,
        (401, "missing_credentials".into())
    );
    let response = http
        .get(&url)
        .header("x-api-key", "kw_live_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(code(response).await, (401, "malformed_key".into()));
    let response = http
        .get(&url)
        .header("authorization", format!("users API-Key {key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(code(response).await, (401, "invalid_key".into()));
    let response = http
        .get(&url)
        .header("authorization", format!("Bearer {key}"))
        .header("x-api-key", "kw_live_other")
        .send()
        .await
        .unwrap();
    assert_eq!(code(response).await, (400, "ambiguous_credentials".into()));
    // Non-UTF-8 bytes in the header value.
    let value = reqwest::header::HeaderValue::from_bytes(b"kw_live_\xff\xfe").unwrap();
    let response = http
        .get(&url)
        .header("x-api-key", value)
        .send()
        .await
        .unwrap();
    assert_eq!(code(response).await, (401, "malformed_key".into()));

    fx.manager
        .update(
            created.record.id,
            KeyPatch {
                scopes: Some(vec!["read".into()]),
                ..KeyPatch::default()
            },
        )
        .await
        .unwrap();
    let admin = format!("http://{addr}/admin");
    let response = http
        .get(&admin)
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(code(response).await, (403, "insufficient_scope".into()));

    fx.clock.advance(time::Duration::days(31));
    let response = http
        .get(&url)
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(code(response).await, (401, "expired_key".into()));

    fx.manager.revoke(created.record.id).await.unwrap();
    let response = http
        .get(&url)
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(code(response).await, (401, "revoked_key".into()));
    server.abort();
}

/// Raw bytes on the socket: things an HTTP client library will not send.
#[tokio::test]
async fn raw_requests_get_documented_answers() {
    let fx = Fixture::new();
    let key = fx.key(NewKey::new("k", "alice")).await.key;
    let (addr, server) = serve(&fx).await;
    let raw = |headers: String| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET /whoami HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{headers}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
            .await
            .expect("the server answers")
            .unwrap();
        String::from_utf8_lossy(&response).into_owned()
    };
    let k = key.expose();
    let cases = [
        (format!("Authorization: BEARER    {k}\r\n"), "200 OK"),
        (format!("X-Api-Key: \t{k}\t\r\n"), "200 OK"),
        (
            format!("Authorization: Bearer {k}\r\nAuthorization: Bearer {k}\r\n"),
            "400 Bad Request",
        ),
        (
            format!("X-Api-Key: {k}\r\nx-api-key: {k}\r\n"),
            "400 Bad Request",
        ),
        (
            format!("Authorization: Bearer {k} trailing\r\n"),
            "401 Unauthorized",
        ),
        // Bytes 0x80-0xFF are legal obs-text for the HTTP parser and reach the layer...
        (
            "Authorization: Bearer kw_live_\u{ff}\r\n".to_owned(),
            "401 Unauthorized",
        ),
        ("X-Api-Key: \u{0430}pi\r\n".to_owned(), "401 Unauthorized"),
        // ...a control byte does not: hyper refuses the request before any middleware runs.
        (
            "Authorization: Bearer kw_live_\u{1}\r\n".to_owned(),
            "400 Bad Request",
        ),
        ("Authorization: \r\n".to_owned(), "401 Unauthorized"),
    ];
    for (headers, expected) in cases {
        let response = raw(headers.clone()).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {expected}")),
            "{headers:?} → {response}"
        );
        assert!(!response.contains(k), "the key is never echoed");
    }
    server.abort();
}
