//! A `keywarden serve` child process for end-to-end tests of the binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running `keywarden serve`, killed on drop (also when a test fails). Its stdout and
/// stderr go to files beside the test's database, readable while it runs.
pub struct ServeProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`, from the `listening on` line.
    pub base: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl ServeProcess {
    /// `binary` run in `dir`, without the `KEYWARDEN_*` variables of the test's own
    /// environment (the test sets what the process gets).
    pub fn command(binary: &str, dir: &Path) -> Command {
        let mut cmd = Command::new(binary);
        cmd.current_dir(dir);
        for (var, _) in std::env::vars() {
            if var.starts_with("KEYWARDEN_") {
                cmd.env_remove(var);
            }
        }
        cmd
    }

    /// Spawns `command` (the binary with `serve` and its arguments) with its output in
    /// `dir/name.out` and `dir/name.err`, and waits for its `listening on` line.
    pub fn spawn(mut command: Command, dir: &Path, name: &str) -> Self {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let child = command
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut server = Self {
            child,
            base: String::new(),
            stdout,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = server.stdout();
            if let Some(line) = out.lines().find(|l| l.starts_with("listening on ")) {
                server.base = line["listening on ".len()..].trim().to_owned();
                return server;
            }
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("serve exited with {status}: {}", server.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "serve did not start: {}",
                server.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The port the server listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.base
            .trim_start_matches("http://")
            .parse()
            .expect("a socket address")
    }

    /// Waits until `/healthz` answers `ok`.
    pub async fn wait_healthy(&self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = http.get(self.url("/healthz")).send().await {
                if response.status() == 200 {
                    assert_eq!(response.text().await.unwrap(), "ok");
                    return;
                }
            }
            assert!(Instant::now() < deadline, "/healthz never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM (by pid, with the `kill` tool); false if it could not be sent.
    pub fn send_sigterm(&self) -> bool {
        matches!(
            Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status(),
            Ok(status) if status.success()
        )
    }

    /// Waits up to `timeout` for the process to exit; panics if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit within {timeout:?}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then expects a clean exit (graceful shutdown) and `shut down` on stdout.
    pub fn terminate(mut self) {
        if !self.send_sigterm() {
            return; // no `kill` tool: Drop kills the child
        }
        let status = self.wait_exit(Duration::from_secs(20));
        assert!(
            status.success(),
            "serve exited with {status}: {}",
            self.stderr()
        );
        let out = self.stdout();
        assert!(out.contains("shut down"), "{out}");
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
