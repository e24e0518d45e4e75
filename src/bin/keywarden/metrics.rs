//! `serve --metrics-addr`: Prometheus text at `GET /metrics`, on a listener of its own so the
//! API's routes, layer and address stay apart from the operators' scrape endpoint.

use std::net::SocketAddr;
use std::time::Duration as StdDuration;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Failure;

/// How often histograms are drained without a scrape (the exporter's own default).
const UPKEEP_INTERVAL: StdDuration = StdDuration::from_secs(5);

/// The Prometheus text format's content type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The running endpoint: dropping it stops serving and the upkeep.
pub(crate) struct MetricsEndpoint {
    /// The bound address (port 0 resolved).
    pub(crate) addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    upkeep: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.server.abort();
        self.upkeep.abort();
    }
}

/// Binds `addr`, installs the Prometheus recorder as the process's `metrics` recorder, and
/// serves it. Call it before building the layer: the layer registers its metrics with the
/// recorder installed when it is built.
pub(crate) async fn start(addr: &str) -> Result<MetricsEndpoint, Failure> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Failure(format!("cannot listen on {addr} for metrics: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Failure(format!("cannot read the metrics address: {e}")))?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(keywarden::metrics::STORE_LOOKUP_DURATION.to_owned()),
            keywarden::metrics::STORE_LOOKUP_BUCKETS,
        )
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|e| Failure(format!("cannot install the metrics recorder: {e}")))?;
    let upkeep = tokio::spawn({
        let handle = handle.clone();
        async move {
            loop {
                tokio::time::sleep(UPKEEP_INTERVAL).await;
                handle.run_upkeep();
            }
        }
    });
    let app = Router::new().route("/metrics", get(move || render(handle.clone())));
    let server = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("warning: the metrics endpoint stopped: {error}");
        }
    });
    Ok(MetricsEndpoint {
        addr: local,
        server,
        upkeep,
    })
}

async fn render(handle: PrometheusHandle) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    ([(CONTENT_TYPE, PROMETHEUS_TEXT)], handle.render())
}
