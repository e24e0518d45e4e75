//! Forward auth behind a real nginx (`auth_request`), configured with exactly the file
//! docs/gateways.md shows (docs/gateways/nginx.conf), in front of a small upstream that
//! echoes the identity headers it sees.
//!
//! Needs the `nginx` binary (Debian package `nginx`; or set `KEYWARDEN_NGINX` to its path).
//! Without it the test is skipped with a message, except under `CI=true`, where it fails.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keywarden::ratelimit::ClientAddressSource;
use keywarden::server::AuthServer;
use support::gateway::{
    find_binary, forward_auth_scenario, free_port, serve, upstream, ScenarioKeys,
};
use support::{Fixture, TempDir};

/// The configuration docs/gateways.md ships.
const SHIPPED: &str = include_str!("../docs/gateways/nginx.conf");

/// The nginx binary, or `None` (skip) when it is not installed outside CI.
fn nginx_binary() -> Option<PathBuf> {
    find_binary(
        "nginx",
        "KEYWARDEN_NGINX",
        "nginx",
        &["/usr/sbin/nginx", "/usr/local/sbin/nginx"],
    )
}

/// An nginx started by this test, killed (by its own pid) on drop.
struct Nginx {
    child: Child,
    error_log: PathBuf,
}

impl Nginx {
    fn start(binary: &Path, dir: &Path, port: u16, keywarden: SocketAddr, app: SocketAddr) -> Self {
        let mut site = SHIPPED.to_owned();
        for (from, to) in [
            ("server 127.0.0.1:3000;", format!("server {keywarden};")),
            ("server 127.0.0.1:8080;", format!("server {app};")),
            ("listen 80;", format!("listen 127.0.0.1:{port};")),
        ] {
            assert!(site.contains(from), "the shipped config has `{from}`");
            site = site.replace(from, &to);
        }
        let d = dir.display();
        // One process, as the current user, in the foreground; every path in the temp dir.
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/client_body;\n\
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{site}\n}}\n"
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let error_log = dir.join("error.log");
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(&error_log)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let nginx = Self { child, error_log };
        nginx.wait_listening(port, dir);
        nginx
    }

    fn wait_listening(&self, port: u16, dir: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            let stderr = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {stderr} {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.error_log).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Only the process this test started.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn docs_show_the_tested_nginx_config() {
    let docs = include_str!("../docs/gateways.md");
    assert!(
        docs.contains(SHIPPED.trim_end()),
        "docs/gateways.md must show docs/gateways/nginx.conf verbatim"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_in_front_of_an_upstream() {
    let Some(binary) = nginx_binary() else {
        return;
    };
    let fx = Fixture::new();
    let keys = ScenarioKeys::create(&fx).await;
    let keywarden = serve(
        AuthServer::new(fx.layer.clone())
            .client_address(ClientAddressSource::TrustedHeader(
                "x-real-ip".parse().unwrap(),
            ))
            .router(),
    )
    .await;
    let hits = Arc::new(AtomicUsize::new(0));
    let app = upstream(hits.clone()).await;
    let dir = TempDir::new("nginx");
    let port = free_port();
    let nginx = Nginx::start(&binary, dir.path(), port, keywarden, app);
    let url = format!("http://127.0.0.1:{port}/orders/7");
    forward_auth_scenario(&url, &keys, &hits, true, || nginx.log()).await;
    drop(nginx);
}
