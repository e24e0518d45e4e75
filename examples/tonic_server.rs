//! A tonic gRPC server behind keywarden: the standard health service, authenticated by API key.
//!
//! ```text
//! cargo run --example tonic_server
//! ```
//!
//! It serves `grpc.health.v1.Health` on `127.0.0.1:50051` (`KEYWARDEN_ADDR` overrides) behind an
//! [`ApiKeyLayer`] over an in-memory store, creates one key with the scope `health:check` at
//! startup and prints it once, with a `grpcurl` command to call the server. The same layer that
//! guards axum routes guards tonic services: a rejection is a gRPC status (`UNAUTHENTICATED`
//! without a valid key, `PERMISSION_DENIED` without the scope [`RequireScopeLayer`] asks for), and
//! the service reads the caller as a [`Principal`] from the request extensions, here in an
//! interceptor.
//!
//! Self-check: `cargo run --example tonic_server -- --check` starts the server on a free port,
//! calls it with a tonic client with the key (`SERVING`), without a key (`UNAUTHENTICATED`) and
//! with a key lacking the scope (`PERMISSION_DENIED`), and exits 0 when each answer is right.

use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use keywarden::{
    ApiKeyLayer, Collection, KeyManager, MemoryStore, NewKey, Principal, RequireScopeLayer,
    SecretRing,
};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use zeroize::Zeroizing;

const DEFAULT_ADDR: &str = "127.0.0.1:50051";
const COLLECTION: &str = "services";
const SCOPE: &str = "health:check";

#[tokio::main]
async fn main() -> ExitCode {
    let check = std::env::args().skip(1).any(|arg| arg == "--check");
    match run(check).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(check: bool) -> Result<(), Box<dyn Error>> {
    let layer = ApiKeyLayer::builder()
        .store(Arc::new(MemoryStore::new()))
        .secrets(process_secrets()?)
        .collection(Collection::new(COLLECTION))
        .build()?;
    let manager = KeyManager::for_layer(&layer);

    // The self-check takes any free port, so it never collides with a running server.
    let addr = if check {
        "127.0.0.1:0".to_owned()
    } else {
        std::env::var("KEYWARDEN_ADDR").unwrap_or_else(|_| DEFAULT_ADDR.to_owned())
    };
    let listener = TcpListener::bind(&addr).await.map_err(|e| {
        format!("cannot listen on {addr}: {e} (set KEYWARDEN_ADDR to another address)")
    })?;
    let addr = listener.local_addr()?;
    let created = manager
        .create(
            NewKey::new("health-probe", "probe-1")
                .collection(COLLECTION)
                .scope(SCOPE),
        )
        .await?;
    let key = created.key.expose();

    if check {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, layer, async {
            let _ = stopped.await;
        }));
        let outcome = self_check(addr, key, &manager).await;
        let _ = stop.send(());
        server.await??;
        return outcome;
    }

    println!("Serving grpc.health.v1.Health on {addr}. The key, shown once:\n\n  {key}\n");
    println!("Call it (health.proto is proto/health.proto in the tonic-health crate):\n");
    println!(
        "  grpcurl -plaintext -proto health.proto -H 'x-api-key: {key}' {addr} \
         grpc.health.v1.Health/Check\n"
    );
    println!("Without the header the answer is Unauthenticated. Ctrl-C stops the server.");
    serve(listener, layer, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

/// The health service behind the layer, then the scope check, until `shutdown` completes.
async fn serve(
    listener: TcpListener,
    layer: ApiKeyLayer,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    Server::builder()
        .layer(layer)
        .layer(RequireScopeLayer::new(SCOPE))
        .add_service(InterceptedService::new(health, caller))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
}

/// The service sees who called through the request extensions, like any handler.
fn caller(request: Request<()>) -> Result<Request<()>, Status> {
    let principal = request
        .extensions()
        .get::<Principal>()
        .ok_or_else(|| Status::internal("no principal: is the service behind the layer?"))?;
    println!(
        "health check by {} (key {})",
        principal.subject(),
        principal.key_name()
    );
    Ok(request)
}

/// A secret for this process only: the store is in memory, so its keys end with it anyway. A
/// real server keeps keys in a database and loads the same ring on every start, with
/// `SecretRing::from_env()`.
fn process_secrets() -> Result<SecretRing, Box<dyn Error>> {
    let mut random = Zeroizing::new([0u8; 32]);
    getrandom::fill(random.as_mut()).map_err(|e| format!("the OS gave no randomness: {e}"))?;
    let hex: Zeroizing<String> =
        Zeroizing::new(random.iter().map(|b| format!("{b:02x}")).collect());
    Ok(SecretRing::from_strs(&hex, None)?)
}

async fn self_check(
    addr: SocketAddr,
    key: &str,
    manager: &KeyManager,
) -> Result<(), Box<dyn Error>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);

    let response = client.check(health_check(Some(key))).await?.into_inner();
    if response.status != ServingStatus::Serving as i32 {
        return Err(format!(
            "with the key: status {} instead of SERVING",
            response.status
        )
        .into());
    }
    expect_code(
        client.check(health_check(None)).await,
        Code::Unauthenticated,
        "without a key",
    )?;
    let unscoped = manager
        .create(NewKey::new("no-scope", "probe-2").collection(COLLECTION))
        .await?;
    expect_code(
        client
            .check(health_check(Some(unscoped.key.expose())))
            .await,
        Code::PermissionDenied,
        "with a key lacking the scope",
    )?;
    println!("self-check passed: SERVING with the key, UNAUTHENTICATED without, PERMISSION_DENIED without the scope");
    Ok(())
}

fn health_check(key: Option<&str>) -> Request<HealthCheckRequest> {
    let mut request = Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if let Some(key) = key {
        request.metadata_mut().insert(
            "x-api-key",
            key.parse().expect("a key is a valid header value"),
        );
    }
    request
}

fn expect_code<T>(result: Result<T, Status>, code: Code, case: &str) -> Result<(), Box<dyn Error>> {
    match result {
        Err(status) if status.code() == code => Ok(()),
        Err(status) => Err(format!(
            "{case}: {:?} ({}) instead of {code:?}",
            status.code(),
            status.message()
        )
        .into()),
        Ok(_) => Err(format!("{case}: OK instead of {code:?}").into()),
    }
}
