//! Per-key IP allowlists: the layer through `oneshot` with connection addresses, behind trusted
//! proxies, over a real loopback server with a real client (IPv4 and IPv6), in front of tonic,
//! in every store, through the management API (`keys:self` may only narrow), and through the
//! verification API.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use http::Request;
use keywarden::net::IpNetwork;
use keywarden::ratelimit::{
    ClientAddressSource, ClientIp, FailedAttemptLimit, RateLimitPolicy, TrustedProxies,
};
use keywarden::server::AuthServer;
use keywarden::store::KeyPatch;
use keywarden::{layer::BuildErrorKind, ApiKeyLayer, Collection, KeyManager, NewKey};
use serde_json::{json, Value};
use support::{ring, send, Fixture, ManagementApi};

fn net(text: &str) -> IpNetwork {
    text.parse().unwrap()
}

/// `GET /whoami` with the key, from `peer` (a socket address) when given.
fn whoami(key: &str, peer: Option<&str>) -> Request<Body> {
    let mut req = Request::builder()
        .uri("/whoami")
        .header("x-api-key", key)
        .body(Body::empty())
        .unwrap();
    if let Some(peer) = peer {
        req.extensions_mut()
            .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    }
    req
}

#[tokio::test]
async fn a_key_is_accepted_only_from_its_networks() {
    let fx = Fixture::new();
    let listed = fx
        .key(
            NewKey::new("office", "alice")
                .allow_ip(net("10.0.0.0/8"))
                .allow_ip(net("2001:db8::/32")),
        )
        .await;
    assert_eq!(
        listed.record.allowed_ips,
        vec![net("10.0.0.0/8"), net("2001:db8::/32")]
    );
    let key = listed.key.expose();
    let app = fx.app();
    for peer in ["10.1.2.3:443", "[2001:db8::9]:443", "[::ffff:10.9.8.7]:443"] {
        let reply = send(&app, whoami(key, Some(peer))).await;
        assert_eq!(reply.status, 200, "{peer}: {}", reply.text());
        assert_eq!(
            reply.json()["allowed_ips"],
            json!(["10.0.0.0/8", "2001:db8::/32"])
        );
    }
    for peer in [
        "192.0.2.1:443",
        "11.0.0.1:443",
        "[2001:db9::1]:443",
        "[::1]:443",
    ] {
        let reply = send(&app, whoami(key, Some(peer))).await;
        assert_eq!(reply.status, 403, "{peer}");
        assert_eq!(reply.code(), "ip_not_allowed");
        let detail = reply.json()["detail"].as_str().unwrap().to_owned();
        assert_eq!(detail, "the key may not be used from this address");
        assert!(
            !reply.headers.contains_key("www-authenticate"),
            "another key would not help: no challenge"
        );
        assert!(
            !reply.text().contains(&peer[..4]),
            "the address is not echoed"
        );
    }
    // No address known: refused (fail closed), with a detail that says why.
    let reply = send(&app, whoami(key, None)).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.code(), "ip_not_allowed");
    assert!(reply.json()["detail"]
        .as_str()
        .unwrap()
        .contains("address is unknown"));
    // A key without a list needs no address at all.
    let open = fx.key(NewKey::new("anywhere", "bob")).await;
    let reply = send(&app, whoami(open.key.expose(), None)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["allowed_ips"], json!([]));
    // A `ClientIp` extension (tonic, hyper servers) counts as the connection's address.
    let mut req = whoami(key, None);
    req.extensions_mut()
        .insert(ClientIp("10.0.0.1".parse().unwrap()));
    assert_eq!(send(&app, req).await.status, 200);
}

#[tokio::test]
async fn the_allowlist_is_checked_after_revocation_and_before_rate_limits() {
    let fx = Fixture::new();
    let created = fx
        .key(
            NewKey::new("limited", "alice")
                .allow_ip(net("10.0.0.0/8"))
                .rate_limit("2/min".parse::<RateLimitPolicy>().unwrap()),
        )
        .await;
    let key = created.key.expose();
    let app = fx.app();
    // Refused requests from elsewhere spend none of the key's budget.
    for _ in 0..5 {
        let reply = send(&app, whoami(key, Some("192.0.2.1:1"))).await;
        assert_eq!(reply.code(), "ip_not_allowed");
        assert!(!reply.headers.contains_key("ratelimit-remaining"));
    }
    for remaining in ["1", "0"] {
        let reply = send(&app, whoami(key, Some("10.0.0.1:1"))).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.headers["ratelimit-remaining"], remaining);
    }
    assert_eq!(
        send(&app, whoami(key, Some("10.0.0.1:1"))).await.code(),
        "rate_limited"
    );
    // A revoked key is `revoked_key` wherever it comes from: the allowlist does not tell an
    // outsider that the key was valid once.
    fx.manager.revoke(created.record.id).await.unwrap();
    for peer in ["192.0.2.1:1", "10.0.0.1:1"] {
        assert_eq!(
            send(&app, whoami(key, Some(peer))).await.code(),
            "revoked_key"
        );
    }
}

#[tokio::test]
async fn behind_trusted_proxies_only_their_forwarded_address_counts() {
    let proxies = TrustedProxies::new(
        "x-forwarded-for".parse().unwrap(),
        [net("127.0.0.1"), net("::1")],
    );
    let fx = Fixture::with(|b| b.client_address(ClientAddressSource::TrustedProxies(proxies)));
    let key = fx
        .key(NewKey::new("office", "alice").allow_ip(net("198.51.100.0/24")))
        .await
        .key;
    let app = fx.app();
    let forwarded = |peer: &str, xff: &str| {
        let mut req = whoami(key.expose(), Some(peer));
        req.headers_mut()
            .insert("x-forwarded-for", xff.parse().unwrap());
        req
    };
    // Through the proxy: the client it names.
    assert_eq!(
        send(&app, forwarded("127.0.0.1:9", "198.51.100.7"))
            .await
            .status,
        200
    );
    assert_eq!(
        send(&app, forwarded("[::1]:9", "203.0.113.5, 198.51.100.7"))
            .await
            .status,
        200,
        "the rightmost untrusted hop is the client"
    );
    assert_eq!(
        send(&app, forwarded("127.0.0.1:9", "198.51.100.7, 203.0.113.5"))
            .await
            .code(),
        "ip_not_allowed",
        "a client cannot prepend an allowed address"
    );
    // Anyone else is the client itself, whatever it claims.
    assert_eq!(
        send(&app, forwarded("203.0.113.5:9", "198.51.100.7"))
            .await
            .code(),
        "ip_not_allowed"
    );
    assert_eq!(
        send(&app, whoami(key.expose(), Some("198.51.100.9:9")))
            .await
            .status,
        200
    );
    // A proxy that forwarded no usable address is never taken for the client, even when its
    // own address is on the list.
    let local = fx
        .key(NewKey::new("local", "bob").allow_ip(net("127.0.0.0/8")))
        .await
        .key;
    assert_eq!(
        send(&app, whoami(local.expose(), Some("127.0.0.1:9")))
            .await
            .code(),
        "ip_not_allowed"
    );
    for garbage in ["", "unknown", "not-an-address"] {
        assert_eq!(
            send(&app, forwarded_for(local.expose(), "127.0.0.1:9", garbage))
                .await
                .code(),
            "ip_not_allowed",
            "{garbage:?}"
        );
    }
}

fn forwarded_for(key: &str, peer: &str, xff: &str) -> Request<Body> {
    let mut req = whoami(key, Some(peer));
    req.headers_mut()
        .insert("x-forwarded-for", xff.parse().unwrap());
    req
}

#[tokio::test]
async fn a_trusted_header_that_is_missing_is_an_unknown_address() {
    let fx = Fixture::with(|b| {
        b.client_address(ClientAddressSource::TrustedHeader(
            "x-real-ip".parse().unwrap(),
        ))
    });
    let key = fx
        .key(NewKey::new("local", "alice").allow_ip(net("127.0.0.0/8")))
        .await
        .key;
    let app = fx.app();
    // The connection (the proxy) is on the list, but only the header names the client.
    assert_eq!(
        send(&app, whoami(key.expose(), Some("127.0.0.1:9")))
            .await
            .code(),
        "ip_not_allowed"
    );
    let mut req = whoami(key.expose(), Some("10.0.0.1:9"));
    req.headers_mut()
        .insert("x-real-ip", "127.0.0.5".parse().unwrap());
    assert_eq!(send(&app, req).await.status, 200);
}

#[tokio::test]
async fn one_client_address_source_per_layer() {
    let built = ApiKeyLayer::builder()
        .store(Arc::new(keywarden::MemoryStore::new()))
        .secrets(ring())
        .collection(Collection::new("users"))
        .client_address(ClientAddressSource::TrustedHeader(
            "x-real-ip".parse().unwrap(),
        ))
        .failed_attempt_limit(
            FailedAttemptLimit::new(5, std::time::Duration::from_secs(60))
                .client_address(ClientAddressSource::Connection),
        )
        .build();
    assert_eq!(
        built.err().map(|e| e.kind()),
        Some(BuildErrorKind::ConflictingClientAddress)
    );
    // The same source in both places, or in one: fine; the limit uses the layer's.
    let header = ClientAddressSource::TrustedHeader("x-real-ip".parse().unwrap());
    let fx = Fixture::with(|b| {
        b.client_address(header.clone())
            .failed_attempt_limit(FailedAttemptLimit::new(
                1,
                std::time::Duration::from_secs(60),
            ))
    });
    let key = fx
        .key(NewKey::new("k", "alice").allow_ip(net("192.0.2.0/24")))
        .await
        .key;
    let app = fx.app();
    let mut req = whoami(key.expose(), Some("10.0.0.1:1"));
    req.headers_mut()
        .insert("x-real-ip", "192.0.2.44".parse().unwrap());
    assert_eq!(send(&app, req).await.status, 200);
    // An unknown key from 203.0.113.1 (per the header) blocks that address, not the peer's.
    let unknown = Fixture::new().key(NewKey::new("x", "eve")).await.key;
    for code in ["invalid_key", "rate_limited"] {
        let mut req = whoami(unknown.expose(), Some("10.0.0.1:1"));
        req.headers_mut()
            .insert("x-real-ip", "203.0.113.1".parse().unwrap());
        assert_eq!(send(&app, req).await.code(), code);
    }
    let mut req = whoami(key.expose(), Some("10.0.0.1:1"));
    req.headers_mut()
        .insert("x-real-ip", "192.0.2.44".parse().unwrap());
    assert_eq!(send(&app, req).await.status, 200);
}

/// A real server on IPv4 and IPv6 loopback, a real HTTP client.
#[tokio::test]
async fn a_real_server_over_loopback_checks_the_connection_address() {
    let fx = Fixture::new();
    let local = fx
        .key(
            NewKey::new("local", "alice")
                .allow_ip(net("127.0.0.0/8"))
                .allow_ip(net("::1")),
        )
        .await
        .key;
    let elsewhere = fx
        .key(NewKey::new("office", "bob").allow_ip(net("10.0.0.0/8")))
        .await
        .key;
    let client = reqwest::Client::new();
    for bind in ["127.0.0.1:0", "[::1]:0"] {
        let Ok(listener) = tokio::net::TcpListener::bind(bind).await else {
            assert_ne!(bind, "127.0.0.1:0", "IPv4 loopback must be available");
            eprintln!("skipping {bind}: IPv6 loopback is not available here");
            continue;
        };
        let addr = listener.local_addr().unwrap();
        let app = fx.app();
        let server = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap();
        });
        let url = format!("http://{addr}/whoami");
        let res = client
            .get(&url)
            .header("x-api-key", local.expose())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{bind}");
        let principal: Value = res.json().await.unwrap();
        assert_eq!(principal["subject"], "alice");
        let res = client
            .get(&url)
            .header("x-api-key", elsewhere.expose())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 403, "{bind}");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["code"], "ip_not_allowed");
        server.abort();
    }
}

#[tokio::test]
async fn grpc_clients_get_permission_denied() {
    use tonic::transport::server::{TcpConnectInfo, TcpIncoming};
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let fx = Fixture::new();
    let local = fx
        .key(NewKey::new("local", "svc").allow_ip(net("127.0.0.0/8")))
        .await
        .key;
    let elsewhere = fx
        .key(NewKey::new("office", "svc").allow_ip(net("10.0.0.0/8")))
        .await
        .key;
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let layer = fx.layer.clone();
    // tonic's own connect info is not read by the layer: a server inserts a `ClientIp`.
    let client_ip = tower::util::MapRequestLayer::new(|mut req: http::Request<_>| {
        let peer = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr);
        if let Some(peer) = peer {
            req.extensions_mut().insert(ClientIp(peer.ip()));
        }
        req
    });
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(client_ip)
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let check = |key: &str| {
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        req.metadata_mut().insert("x-api-key", key.parse().unwrap());
        req
    };
    let serving = client.check(check(local.expose())).await.unwrap();
    assert_eq!(serving.into_inner().status, 1);
    let status = client.check(check(elsewhere.expose())).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::PermissionDenied, "ip_not_allowed")
    );
    server.abort();
}

/// Stored, read back and changed in every store; a change reaches the layer at once.
#[tokio::test]
async fn every_store_keeps_the_allowlist_and_a_change_applies_at_once() {
    for (name, store, pg) in support::every_store("allowlist").await {
        let layer = ApiKeyLayer::builder()
            .store(store.clone())
            .secrets(ring())
            .collection(Collection::new("users"))
            .build()
            .unwrap();
        let manager = KeyManager::for_layer(&layer);
        let created = manager
            .create(
                NewKey::new("k", "alice")
                    .allow_ip(net("2001:db8::/32"))
                    .allow_ip(net("10.0.0.0/8"))
                    .allow_ip(net("10.0.0.0/8")),
            )
            .await
            .unwrap();
        // Sorted (IPv4 first), without repeats.
        let expected = vec![net("10.0.0.0/8"), net("2001:db8::/32")];
        assert_eq!(created.record.allowed_ips, expected, "{name}");
        let stored = manager.get(created.record.id).await.unwrap();
        assert_eq!(stored.allowed_ips, expected, "{name}");
        let app = support::app().layer(layer.clone());
        let key = created.key.expose();
        assert_eq!(
            send(&app, whoami(key, Some("10.0.0.5:1"))).await.status,
            200,
            "{name}"
        );

        let patch = KeyPatch {
            allowed_ips: Some(vec![net("192.0.2.0/24")]),
            ..KeyPatch::default()
        };
        let updated = manager.update(created.record.id, patch).await.unwrap();
        assert_eq!(updated.allowed_ips, vec![net("192.0.2.0/24")], "{name}");
        assert_eq!(
            send(&app, whoami(key, Some("10.0.0.5:1"))).await.code(),
            "ip_not_allowed",
            "{name}: the cached answer was dropped"
        );
        assert_eq!(
            send(&app, whoami(key, Some("192.0.2.9:1"))).await.status,
            200
        );

        // A rotation's new key keeps the list.
        let rotated = manager
            .rotate(created.record.id, time::Duration::minutes(5))
            .await
            .unwrap();
        assert_eq!(
            rotated.record.allowed_ips,
            vec![net("192.0.2.0/24")],
            "{name}"
        );

        let cleared = KeyPatch {
            allowed_ips: Some(Vec::new()),
            ..KeyPatch::default()
        };
        let updated = manager.update(created.record.id, cleared).await.unwrap();
        assert!(updated.allowed_ips.is_empty(), "{name}");
        assert_eq!(send(&app, whoami(key, None)).await.status, 200, "{name}");

        let too_many = KeyPatch {
            allowed_ips: Some(
                (0..65u8)
                    .map(|i| IpNetwork::new(IpAddr::from([10, 0, i, 0]), 24).unwrap())
                    .collect(),
            ),
            ..KeyPatch::default()
        };
        let error = manager
            .update(created.record.id, too_many)
            .await
            .unwrap_err();
        assert_eq!(error.field(), Some("allowed_ips"), "{name}");
        support::drop_schema(pg).await;
    }
}

#[tokio::test]
async fn the_management_api_sets_shows_and_validates_allowlists() {
    let env = ManagementApi::new().await;
    let reply = env
        .call(
            "POST",
            "/admin/keys",
            &env.admin,
            Some(json!({"name": "office", "subject": "alice", "allowed_ips": ["10.0.0.0/8", "2001:db8::1"]})),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let created = reply.json();
    assert_eq!(
        created["allowed_ips"],
        json!(["10.0.0.0/8", "2001:db8::1/128"])
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let reply = env
        .call("GET", &format!("/admin/keys/{id}"), &env.admin, None)
        .await;
    assert_eq!(
        reply.json()["allowed_ips"],
        json!(["10.0.0.0/8", "2001:db8::1/128"])
    );

    // Bad entries: 422 naming the field and the entry's position, never echoing it.
    for bad in [
        json!(["10.0.0.1/8"]),
        json!(["10.0.0.0/16", "kw_live_pasted_by_mistake"]),
        json!(["10.0.0.0/33"]),
        json!(["example.com"]),
    ] {
        for (method, uri, body) in [
            (
                "POST",
                "/admin/keys".to_owned(),
                json!({"name": "x", "allowed_ips": bad}),
            ),
            (
                "PATCH",
                format!("/admin/keys/{id}"),
                json!({"allowed_ips": bad}),
            ),
        ] {
            let reply = env.call(method, &uri, &env.admin, Some(body)).await;
            assert_eq!(reply.status, 422, "{method} {bad}: {}", reply.text());
            let problem = reply.json();
            assert_eq!(problem["errors"][0]["field"], "allowed_ips");
            let text = reply.text();
            assert!(text.contains("entry "), "{text}");
            for entry in bad.as_array().unwrap() {
                assert!(!text.contains(entry.as_str().unwrap()), "{text}");
            }
        }
    }
    for bad in [json!("10.0.0.0/8"), json!([7]), json!({"a": 1})] {
        let reply = env
            .call(
                "PATCH",
                &format!("/admin/keys/{id}"),
                &env.admin,
                Some(json!({"allowed_ips": bad})),
            )
            .await;
        assert_eq!(reply.status, 422, "{bad}: {}", reply.text());
    }
    let many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
    let reply = env
        .call(
            "PATCH",
            &format!("/admin/keys/{id}"),
            &env.admin,
            Some(json!({"allowed_ips": many})),
        )
        .await;
    assert_eq!(reply.status, 422);
    assert!(
        reply.text().contains("holds 65 networks; at most 64"),
        "{}",
        reply.text()
    );
    let reply = env
        .call(
            "PATCH",
            &format!("/admin/keys/{id}"),
            &env.admin,
            Some(json!({"allowed_ips": []})),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["allowed_ips"], json!([]));
    // `null` clears too.
    let uri = format!("/admin/keys/{id}");
    let patch = |body: Value| env.call("PATCH", &uri, &env.admin, Some(body));
    let reply = patch(json!({"allowed_ips": ["10.0.0.0/8"]})).await;
    assert_eq!(reply.json()["allowed_ips"], json!(["10.0.0.0/8"]));
    let reply = patch(json!({"allowed_ips": null})).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["allowed_ips"], json!([]));
}

#[tokio::test]
async fn a_self_key_only_narrows_allowlists_within_its_own() {
    let env = ManagementApi::new().await;
    let own = env
        .fx
        .key(
            NewKey::new("me", "alice")
                .scope("keys:self")
                .scope("read")
                .allow_ip(net("10.0.0.0/8")),
        )
        .await;
    let me = own.key.expose();
    // Nothing asked: the new key inherits the caller's list.
    let reply = env
        .call("POST", "/admin/keys", me, Some(json!({"name": "child"})))
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.json()["allowed_ips"], json!(["10.0.0.0/8"]));
    let child = reply.json()["id"].as_str().unwrap().to_owned();
    // Inside its own: fine.
    let reply = env
        .call(
            "POST",
            "/admin/keys",
            me,
            Some(json!({"name": "narrow", "allowed_ips": ["10.1.0.0/16", "10.2.3.4"]})),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    // Anywhere, another network, a wider one, another family: refused.
    for wider in [
        json!([]),
        json!(["192.0.2.0/24"]),
        json!(["0.0.0.0/0"]),
        json!(["::/0"]),
    ] {
        let reply = env
            .call(
                "POST",
                "/admin/keys",
                me,
                Some(json!({"name": "wide", "allowed_ips": wider})),
            )
            .await;
        assert_eq!(reply.status, 403, "{wider}: {}", reply.text());
        assert_eq!(reply.code(), "insufficient_scope");
        let reply = env
            .call(
                "PATCH",
                &format!("/admin/keys/{child}"),
                me,
                Some(json!({"allowed_ips": wider})),
            )
            .await;
        assert_eq!(reply.status, 403, "{wider}: {}", reply.text());
    }
    // Narrowing its own keys: fine; widening back to what it was: refused.
    let reply = env
        .call(
            "PATCH",
            &format!("/admin/keys/{child}"),
            me,
            Some(json!({"allowed_ips": ["10.5.0.0/16"]})),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = env
        .call(
            "PATCH",
            &format!("/admin/keys/{child}"),
            me,
            Some(json!({"allowed_ips": ["10.0.0.0/8"]})),
        )
        .await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    // A key of its own usable from more places (set by an admin) is not the caller's to
    // rotate: the new key's plaintext would be usable where the caller's is not.
    let reply = env
        .call(
            "POST",
            "/admin/keys",
            &env.admin,
            Some(json!({"name": "roaming", "subject": "alice", "collection": "users", "environment": "live"})),
        )
        .await;
    let roaming = reply.json()["id"].as_str().unwrap().to_owned();
    let reply = env
        .call(
            "POST",
            &format!("/admin/keys/{roaming}/rotate"),
            me,
            Some(json!({})),
        )
        .await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert!(reply.text().contains("addresses"), "{}", reply.text());
    // An unrestricted self key may set any list on its keys.
    let free = env
        .fx
        .key(NewKey::new("free", "bob").scope("keys:self"))
        .await;
    let reply = env
        .call(
            "POST",
            "/admin/keys",
            free.key.expose(),
            Some(json!({"name": "c", "allowed_ips": ["192.0.2.0/24"]})),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
}

/// `POST /v1/keys/verify` of `key` by the caller key `caller`, on a connection from `peer`,
/// naming the client in `X-Real-IP` when given.
fn verify_request(caller: &str, key: &str, peer: &str, real_ip: Option<&str>) -> Request<Body> {
    let mut builder = Request::builder()
        .method("POST")
        .uri("/v1/keys/verify")
        .header("x-api-key", caller)
        .header("content-type", "application/json");
    if let Some(ip) = real_ip {
        builder = builder.header("x-real-ip", ip);
    }
    let mut req = builder
        .body(Body::from(json!({ "key": key }).to_string()))
        .unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    req
}

#[tokio::test]
async fn the_verify_api_checks_the_forwarded_client() {
    let fx = Fixture::new();
    let caller = fx
        .key(NewKey::new("gateway", "svc").scope("keys:verify"))
        .await
        .key;
    let key = fx
        .key(NewKey::new("office", "alice").allow_ip(net("198.51.100.0/24")))
        .await
        .key;
    let with_header: Router = AuthServer::new(fx.layer.clone())
        .client_address(ClientAddressSource::TrustedHeader(
            "x-real-ip".parse().unwrap(),
        ))
        .router();
    let without: Router = AuthServer::new(fx.layer.clone()).router();
    // From the calling gateway's own connection, inside the key's network: never the client.
    let verify = |app: &Router, real_ip: Option<&str>| {
        let req = verify_request(caller.expose(), key.expose(), "198.51.100.1:1", real_ip);
        let app = app.clone();
        async move { send(&app, req).await.json() }
    };
    let verdict = verify(&with_header, Some("198.51.100.20")).await;
    assert_eq!(verdict["valid"], true, "{verdict}");
    assert_eq!(
        verdict["principal"]["allowed_ips"],
        json!(["198.51.100.0/24"])
    );
    let verdict = verify(&with_header, Some("203.0.113.1")).await;
    assert_eq!(
        (verdict["valid"].clone(), verdict["code"].clone()),
        (json!(false), json!("ip_not_allowed"))
    );
    let verdict = verify(&with_header, None).await;
    assert_eq!(
        verdict["code"], "ip_not_allowed",
        "no client named: refused"
    );
    // With trusted proxies, a caller that is not one of them is never the client: its own
    // address (inside the key's network here) is not what the allowlist checks.
    let proxied: Router = AuthServer::new(fx.layer.clone())
        .client_address(ClientAddressSource::TrustedProxies(TrustedProxies::new(
            "x-real-ip".parse().unwrap(),
            [net("10.0.3.7")],
        )))
        .router();
    let verdict = verify(&proxied, Some("198.51.100.20")).await;
    assert_eq!(verdict["code"], "ip_not_allowed", "{verdict}");
    let through_gateway = |real_ip: &str| {
        let req = verify_request(caller.expose(), key.expose(), "10.0.3.7:1", Some(real_ip));
        let app = proxied.clone();
        async move { send(&app, req).await.json() }
    };
    assert_eq!(through_gateway("198.51.100.20").await["valid"], true);
    assert_eq!(
        through_gateway("203.0.113.1").await["code"],
        "ip_not_allowed"
    );
    assert_eq!(through_gateway("garbage").await["code"], "ip_not_allowed");
    // Forward auth checks the same forwarded client.
    let auth = |peer: &str, real_ip: &str| {
        let mut req = Request::builder()
            .uri("/v1/auth")
            .header("x-api-key", key.expose())
            .header("x-real-ip", real_ip)
            .body(Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        let app = proxied.clone();
        async move { send(&app, req).await }
    };
    assert_eq!(auth("10.0.3.7:1", "198.51.100.20").await.status, 200);
    let refused = auth("10.0.3.7:1", "203.0.113.1").await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.headers["x-keywarden-code"], "ip_not_allowed");
    assert_eq!(
        auth("198.51.100.20:1", "198.51.100.20").await.status,
        403,
        "a caller that is not a gateway is never the client"
    );
    // The caller key's own allowlist is judged by its connection: a gateway key limited to
    // the gateway's address verifies keys for clients anywhere.
    let gateway_key = fx
        .key(
            NewKey::new("gw", "svc-gw")
                .scope("keys:verify")
                .allow_ip(net("10.0.3.7")),
        )
        .await
        .key;
    let req = verify_request(
        gateway_key.expose(),
        key.expose(),
        "10.0.3.7:1",
        Some("198.51.100.20"),
    );
    let reply = send(&proxied, req).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["valid"], true);
    let verdict = verify(&without, Some("198.51.100.20")).await;
    assert_eq!(
        verdict["code"], "ip_not_allowed",
        "without a configured source the gateway's address is never taken for the client's"
    );
}
