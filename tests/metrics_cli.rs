#![cfg(feature = "cli")]
//! `keywarden serve --metrics-addr`: a running server scraped over loopback, its Prometheus
//! text parsed: after accepted and rejected requests, the outcome counters have the right
//! values and labels, and no key or key id appears anywhere.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_keywarden");
const SECRET: &str = "metrics-cli-test-secret-0123456789abcdefgh";

fn command(dir: &TempDir) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir.path());
    for var in [
        "KEYWARDEN_PREVIOUS_SECRETS",
        "KEYWARDEN_REDIS_URL",
        "KEYWARDEN_ADDR",
        "KEYWARDEN_METRICS_ADDR",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("KEYWARDEN_DATABASE_URL", dir.db_url())
        .env("KEYWARDEN_SECRET", SECRET);
    cmd
}

/// A `keywarden serve` child with its API and metrics addresses; killed on drop.
struct Served {
    child: Child,
    api: String,
    metrics: String,
}

impl Served {
    fn start(dir: &TempDir) -> Self {
        let stdout = dir.path().join("serve.out");
        let stderr = dir.path().join("serve.err");
        let child = command(dir)
            .args([
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut served = Self {
            child,
            api: String::new(),
            metrics: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = std::fs::read_to_string(&stdout).unwrap_or_default();
            let line = |prefix: &str| {
                out.lines()
                    .find_map(|l| l.strip_prefix(prefix))
                    .map(|rest| rest.trim().to_owned())
            };
            if let (Some(api), Some(metrics)) = (line("listening on "), line("metrics on ")) {
                served.api = api;
                served.metrics = metrics;
                return served;
            }
            if let Some(status) = served.child.try_wait().unwrap() {
                let err = std::fs::read_to_string(&stderr).unwrap_or_default();
                panic!("serve exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "serve did not start: {out}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample line of the Prometheus text format: `name{a="x",b="y"} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        let mut rest = labels;
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
            let end = after.find('"').expect("closing quote");
            map.insert(key.to_owned(), after[..end].to_owned());
            rest = after[end + 1..].trim_start_matches(',');
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels: map,
            value: value.parse().expect("a number"),
        });
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

#[tokio::test]
async fn serve_exports_outcome_counters_in_prometheus_text() {
    let dir = TempDir::new("metrics-cli");
    let created = command(&dir)
        .args([
            "keys",
            "create",
            "--json",
            "--name",
            "k",
            "--subject",
            "alice",
        ])
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let key = json["key"].as_str().unwrap().to_owned();
    let id = json["id"].as_str().unwrap().to_owned();

    let served = Served::start(&dir);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let get = |path: &str, header: Option<(&'static str, String)>| {
        let mut req = http.get(format!("{}{path}", served.api));
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        req.send()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get("/healthz", None).await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "/healthz never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for _ in 0..3 {
        let res = get("/whoami", Some(("x-api-key", key.clone())))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let res = get(
        "/whoami",
        Some(("authorization", format!("users API-Key {key}"))),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    // An unknown key of the right shape: one created, then deleted.
    let unknown = {
        let output = command(&dir)
            .args([
                "keys",
                "create",
                "--json",
                "--name",
                "gone",
                "--subject",
                "bob",
            ])
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let gone = json["id"].as_str().unwrap().to_owned();
        let status = command(&dir)
            .args(["keys", "delete", &gone])
            .status()
            .unwrap();
        assert!(status.success());
        json["key"].as_str().unwrap().to_owned()
    };
    for _ in 0..2 {
        let res = get("/whoami", Some(("x-api-key", unknown.clone())))
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
    }
    let res = get("/whoami", None).await.unwrap();
    assert_eq!(res.status(), 401);
    let res = get("/whoami", Some(("x-api-key", "kw_live_short".to_owned())))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let scrape = http.get(&served.metrics).send().await.unwrap();
    assert_eq!(scrape.status(), 200);
    let content_type = scrape.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = scrape.text().await.unwrap();
    assert!(
        text.contains("# TYPE keywarden_requests_total counter"),
        "{text}"
    );
    let samples = parse(&text);
    let requests = |collection: &str, outcome: &str| {
        value(
            &samples,
            "keywarden_requests_total",
            &[("collection", collection), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("users", "accepted"), Some(4.0), "{text}");
    assert_eq!(requests("", "invalid_key"), Some(2.0), "{text}");
    assert_eq!(requests("", "missing_credentials"), Some(1.0), "{text}");
    assert_eq!(requests("", "malformed_key"), Some(1.0), "{text}");
    assert_eq!(requests("teams", "accepted"), Some(0.0), "{text}");
    assert_eq!(requests("users", "revoked_key"), Some(0.0), "{text}");
    // The first use and the unknown key went to the store; the rest were cache hits.
    let lookups = |result: &str| {
        value(
            &samples,
            "keywarden_cache_lookups_total",
            &[("result", result)],
        )
    };
    assert_eq!(lookups("miss"), Some(2.0), "{text}");
    assert_eq!(lookups("hit"), Some(3.0), "{text}");
    assert_eq!(lookups("negative_hit"), Some(1.0), "{text}");
    let store_count = value(
        &samples,
        "keywarden_store_lookup_duration_seconds_count",
        &[],
    );
    assert_eq!(store_count, Some(2.0), "{text}");
    assert!(
        samples
            .iter()
            .any(|s| s.name == "keywarden_store_lookup_duration_seconds_bucket"),
        "the store latency is a histogram with buckets: {text}"
    );
    // Only the fixed label names, and nothing that identifies a key.
    for sample in samples.iter().filter(|s| s.name.starts_with("keywarden_")) {
        for label in sample.labels.keys() {
            assert!(
                [
                    "collection",
                    "outcome",
                    "result",
                    "kind",
                    "decision",
                    "source",
                    "le"
                ]
                .contains(&label.as_str()),
                "{sample:?}"
            );
        }
    }
    for secret in [&key, &unknown, &id] {
        assert!(!text.contains(secret.as_str()), "{secret} in {text}");
    }
}
