//! Open-loop latency of a running `keywarden serve`: requests are sent on a fixed schedule
//! (`--rate` per second, whatever the answers' speed), and each one's latency is measured from
//! the moment it was *due*, so a slow answer that delays the next send is counted against the
//! server, not hidden (no coordinated omission). Prints one JSON object: the achieved rate,
//! p50/p90/p99/p99.9/max in microseconds, and any failures.
//!
//! Driven by `bench/verify_latency.sh`, which starts the server and creates the keys:
//!
//! ```text
//! verify_latency --url http://127.0.0.1:PORT --target verify|healthz --rate 10000 \
//!     --seconds 10 --caller-key KEY --keys-file keys.txt
//! ```
//!
//! `verify` posts `{"key": K}` to `/v1/keys/verify` (K cycling through the keys file) with the
//! caller key in `X-Api-Key`, and counts only `200` answers with `"valid":true` as successes;
//! `healthz` gets `/healthz`: the same HTTP round trip without keywarden's work, the baseline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

struct Args {
    url: String,
    target: String,
    rate: u64,
    seconds: u64,
    warmup_seconds: u64,
    caller_key: String,
    keys: Vec<String>,
}

fn args() -> Result<Args, String> {
    let mut url = None;
    let mut target = "verify".to_owned();
    let mut rate = 10_000;
    let mut seconds = 10;
    let mut warmup_seconds = 2;
    let mut caller_key = String::new();
    let mut keys_file = None;
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => url = Some(value()?),
            "--target" => target = value()?,
            "--rate" => rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--seconds" => seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--warmup-seconds" => {
                warmup_seconds = value()?.parse().map_err(|e| format!("--warmup: {e}"))?
            }
            "--caller-key" => caller_key = value()?,
            "--keys-file" => keys_file = Some(value()?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    // Bounded: at most 60 s and 50,000 requests per second.
    if rate == 0 || rate > 50_000 || seconds == 0 || seconds > 60 || warmup_seconds > 30 {
        return Err("--rate must be 1..=50000 and --seconds 1..=60".into());
    }
    let keys = match keys_file {
        Some(path) => std::fs::read_to_string(&path)
            .map_err(|e| format!("{path}: {e}"))?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        None => Vec::new(),
    };
    if target == "verify" && (keys.is_empty() || caller_key.is_empty()) {
        return Err("--target verify needs --caller-key and --keys-file".into());
    }
    if target != "verify" && target != "healthz" {
        return Err("--target is verify or healthz".into());
    }
    let url = url.ok_or("--url is required")?;
    if !(url.starts_with("http://127.") || url.starts_with("http://[::1]")) {
        return Err("--url must be a loopback address".into());
    }
    Ok(Args {
        url,
        target,
        rate,
        seconds,
        warmup_seconds,
        caller_key,
        keys,
    })
}

/// Sends `count` requests at `rate` per second starting at `start`; returns each one's
/// latency from its due time (`None` for a failure).
async fn run(
    http: &reqwest::Client,
    args: &Arc<Args>,
    start: Instant,
    count: u64,
) -> Vec<Option<Duration>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let interval = Duration::from_nanos(1_000_000_000 / args.rate);
    for i in 0..count {
        let due = start + interval * u32::try_from(i).expect("bounded count");
        // Wait for the due time without the timer wheel's millisecond granularity: yield
        // to the requests in flight until then (the load generator owns its core).
        while Instant::now() < due {
            tokio::task::yield_now().await;
        }
        let http = http.clone();
        let args = args.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let ok = send(&http, &args, i).await;
            let _ = tx.send(ok.then(|| due.elapsed()));
        });
    }
    drop(tx);
    let mut latencies = Vec::with_capacity(count as usize);
    while let Some(latency) = rx.recv().await {
        latencies.push(latency);
    }
    latencies
}

async fn send(http: &reqwest::Client, args: &Args, i: u64) -> bool {
    if args.target == "healthz" {
        return match http.get(format!("{}/healthz", args.url)).send().await {
            Ok(response) => response.status() == 200 && response.bytes().await.is_ok(),
            Err(_) => false,
        };
    }
    let key = &args.keys[i as usize % args.keys.len()];
    let response = http
        .post(format!("{}/v1/keys/verify", args.url))
        .header("x-api-key", &args.caller_key)
        .header("content-type", "application/json")
        .body(json!({ "key": key }).to_string())
        .send()
        .await;
    match response {
        Ok(response) if response.status() == 200 => match response.bytes().await {
            Ok(body) => body.windows(12).any(|w| w == b"\"valid\":true"),
            Err(_) => false,
        },
        _ => false,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e6
}

fn main() {
    let args = match args() {
        Ok(args) => Arc::new(args),
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(5))
            .build()
            .expect("a client");
        // Warm up: connections opened, keys cached, not recorded.
        let warmup = args.rate * args.warmup_seconds;
        if warmup > 0 {
            run(&http, &args, Instant::now(), warmup).await;
        }
        let count = args.rate * args.seconds;
        let start = Instant::now();
        let results = run(&http, &args, start, count).await;
        let elapsed = start.elapsed();
        let failures = results.iter().filter(|r| r.is_none()).count();
        let mut latencies: Vec<Duration> = results.into_iter().flatten().collect();
        latencies.sort_unstable();
        let report = json!({
            "target": args.target,
            "rate": args.rate,
            "requests": count,
            "achieved_rate": (count as f64 / elapsed.as_secs_f64()).round(),
            "failures": failures,
            "p50_us": percentile(&latencies, 0.50).round(),
            "p90_us": percentile(&latencies, 0.90).round(),
            "p99_us": percentile(&latencies, 0.99).round(),
            "p999_us": percentile(&latencies, 0.999).round(),
            "max_us": latencies.last().map_or(f64::NAN, |d| (d.as_secs_f64() * 1e6).round()),
        });
        println!("{report}");
    });
}
