//! The same layer in front of a real tonic server (the standard gRPC health service), called by
//! a real tonic client.

mod support;

use std::sync::{Arc, Mutex};

use keywarden::{NewKey, Principal, RequireScopeLayer};
use support::Fixture;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

struct Running {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
    server: tokio::task::JoinHandle<()>,
}

async fn start(fx: &Fixture, scope: Option<&'static str>) -> Running {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    // The service sees the principal through request extensions, like any handler.
    let health = tonic::service::interceptor::InterceptedService::new(
        health,
        move |req: tonic::Request<()>| {
            let principal = req
                .extensions()
                .get::<Principal>()
                .ok_or_else(|| tonic::Status::internal("no principal reached the service"))?;
            record.lock().unwrap().push(principal.subject().to_owned());
            Ok(req)
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let layer = fx.layer.clone();
    let server = tokio::spawn(async move {
        let incoming = TcpIncoming::from(listener);
        let result = match scope {
            Some(scope) => {
                Server::builder()
                    .layer(layer)
                    .layer(RequireScopeLayer::new(scope))
                    .add_service(health)
                    .serve_with_incoming(incoming)
                    .await
            }
            None => {
                Server::builder()
                    .layer(layer)
                    .add_service(health)
                    .serve_with_incoming(incoming)
                    .await
            }
        };
        result.unwrap();
    });
    Running { url, seen, server }
}

async fn client(url: &str) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

fn check(metadata: &[(&'static str, String)]) -> tonic::Request<HealthCheckRequest> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    for (name, value) in metadata {
        req.metadata_mut().insert(*name, value.parse().unwrap());
    }
    req
}

#[tokio::test]
async fn grpc_clients_get_grpc_statuses() {
    let fx = Fixture::new();
    let created = fx
        .key(NewKey::new("grpc", "svc-7").collection("services"))
        .await;
    let key = created.key.expose().to_owned();
    let running = start(&fx, None).await;
    let mut client = client(&running.url).await;

    let status = client.check(check(&[])).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), "missing_credentials");

    let status = client
        .check(check(&[("x-api-key", "kw_live_bad".into())]))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unauthenticated, "malformed_key")
    );

    for metadata in [
        vec![("x-api-key", key.clone())],
        vec![("authorization", format!("Bearer {key}"))],
        vec![("authorization", format!("services API-Key {key}"))],
    ] {
        let response = client.check(check(&metadata)).await.unwrap();
        assert_eq!(response.into_inner().status, 1, "SERVING");
    }
    assert_eq!(*running.seen.lock().unwrap(), vec!["svc-7"; 3]);

    let status = client
        .check(check(&[
            ("x-api-key", key.clone()),
            ("authorization", "Bearer kw_live_other".into()),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "ambiguous_credentials")
    );

    fx.manager.revoke(created.record.id).await.unwrap();
    let status = client
        .check(check(&[("x-api-key", key.clone())]))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unauthenticated, "revoked_key")
    );
    running.server.abort();
}

#[tokio::test]
async fn grpc_scope_and_read_only_rejections_are_permission_denied() {
    let fx = Fixture::new();
    let plain = fx.key(NewKey::new("p", "a").scope("other")).await.key;
    let allowed = fx.key(NewKey::new("q", "b").scope("health:*")).await.key;
    let read_only = fx
        .key(NewKey::new("r", "c").scope("*").read_only(true))
        .await
        .key;
    let running = start(&fx, Some("health:check")).await;
    let mut client = client(&running.url).await;
    let status = client
        .check(check(&[("x-api-key", plain.expose().into())]))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::PermissionDenied, "insufficient_scope")
    );
    assert!(client
        .check(check(&[("x-api-key", allowed.expose().into())]))
        .await
        .is_ok());
    // gRPC calls are POSTs: a read-only key cannot make them.
    let status = client
        .check(check(&[("x-api-key", read_only.expose().into())]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    running.server.abort();
}
