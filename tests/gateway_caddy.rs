//! Forward auth behind a real Caddy (`forward_auth`), configured with exactly the file
//! docs/gateways.md shows (docs/gateways/Caddyfile), in front of a small upstream that echoes
//! the identity headers it sees. keywarden trusts Caddy's `X-Forwarded-For` only on Caddy's
//! connections (`ClientAddressSource::TrustedProxies`).
//!
//! Needs the `caddy` binary (Debian package `caddy`; or set `KEYWARDEN_CADDY` to its path).
//! Without it the test is skipped with a message, except under `CI=true`, where it fails.
#![cfg(feature = "manage-api")]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keywarden::net::IpNetwork;
use keywarden::ratelimit::{ClientAddressSource, TrustedProxies};
use keywarden::server::AuthServer;
use support::gateway::{
    find_binary, forward_auth_scenario, free_port, serve, upstream, ScenarioKeys,
};
use support::{Fixture, TempDir};

/// The configuration docs/gateways.md ships.
const SHIPPED: &str = include_str!("../docs/gateways/Caddyfile");

/// A Caddy started by this test, killed (by its own pid) on drop.
struct Caddy {
    child: Child,
    log: PathBuf,
}

impl Caddy {
    fn start(binary: &Path, dir: &Path, port: u16, keywarden: SocketAddr, app: SocketAddr) -> Self {
        let mut site = SHIPPED.to_owned();
        for (from, to) in [
            (
                "forward_auth 127.0.0.1:3000",
                format!("forward_auth {keywarden}"),
            ),
            (
                "reverse_proxy 127.0.0.1:8080",
                format!("reverse_proxy {app}"),
            ),
            ("api.example.com {", format!("http://127.0.0.1:{port} {{")),
        ] {
            assert!(site.contains(from), "the shipped config has `{from}`");
            site = site.replace(from, &to);
        }
        // No admin endpoint (tests run in parallel), no automatic HTTPS, nothing saved.
        let config = format!("{{\n\tadmin off\n\tauto_https off\n}}\n\n{site}");
        let caddyfile = dir.join("Caddyfile");
        std::fs::write(&caddyfile, config).unwrap();
        let log = dir.join("caddy.log");
        let child = Command::new(binary)
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&caddyfile)
            .env("HOME", dir)
            .env("XDG_DATA_HOME", dir.join("data"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let caddy = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "caddy did not start: {}",
                caddy.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        caddy
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        // Only the process this test started.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn docs_show_the_tested_caddyfile() {
    let docs = include_str!("../docs/gateways.md");
    assert!(
        docs.contains(SHIPPED.trim_end()),
        "docs/gateways.md must show docs/gateways/Caddyfile verbatim"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_forward_auth_in_front_of_an_upstream() {
    let Some(binary) = find_binary("caddy", "KEYWARDEN_CADDY", "caddy", &["/usr/bin/caddy"]) else {
        return;
    };
    let fx = Fixture::new();
    let keys = ScenarioKeys::create(&fx).await;
    let proxies = TrustedProxies::new(
        "x-forwarded-for".parse().unwrap(),
        ["127.0.0.1".parse::<IpNetwork>().unwrap()],
    );
    let keywarden = serve(
        AuthServer::new(fx.layer.clone())
            .client_address(ClientAddressSource::TrustedProxies(proxies))
            .router(),
    )
    .await;
    let hits = Arc::new(AtomicUsize::new(0));
    let app = upstream(hits.clone()).await;
    let dir = TempDir::new("caddy");
    let port = free_port();
    let caddy = Caddy::start(&binary, dir.path(), port, keywarden, app);
    let url = format!("http://127.0.0.1:{port}/orders/7");
    forward_auth_scenario(&url, &keys, &hits, false, || caddy.log()).await;
    drop(caddy);
}
