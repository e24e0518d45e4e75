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
//! Requests go over 32 keep-alive HTTP/1.1 connections written and read directly (a few
//! microseconds of client work each), so the client is not what is measured.

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

/// How many keep-alive connections carry the load: enough that one slow answer delays only
/// the requests queued behind it on its own connection.
const CONNECTIONS: usize = 32;

/// The bytes of request `i`: a verify request for key `i % keys`, or a health check.
fn request_bytes(args: &Args, i: usize) -> Vec<u8> {
    if args.target == "healthz" {
        return b"GET /healthz HTTP/1.1\r\nhost: bench\r\n\r\n".to_vec();
    }
    let body = json!({ "key": args.keys[i % args.keys.len()] }).to_string();
    format!(
        "POST /v1/keys/verify HTTP/1.1\r\nhost: bench\r\nx-api-key: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        args.caller_key,
        body.len()
    )
    .into_bytes()
}

/// Reads one HTTP/1.1 response with a `content-length`; true when it is a 200 (and, for
/// verify, says `"valid":true`).
async fn read_response(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    verify: bool,
) -> std::io::Result<bool> {
    use tokio::io::AsyncReadExt;
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[head_end..head_end + length];
    Ok(head.starts_with("http/1.1 200")
        && (!verify || body.windows(12).any(|w| w == b"\"valid\":true")))
}

/// Sends `count` requests at `rate` per second from `start` over [`CONNECTIONS`] keep-alive
/// connections (request `i` on connection `i % CONNECTIONS`); returns each one's latency from
/// its due time (`None` for a failure).
async fn run(args: &Arc<Args>, start: Instant, count: u64) -> Vec<Option<Duration>> {
    use tokio::io::AsyncWriteExt;
    let addr = args.url.trim_start_matches("http://").to_owned();
    let (results_tx, mut results_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut lanes = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, usize)>();
        let mut stream = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect to the server");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let results = results_tx.clone();
        let args = args.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(8192);
            let verify = args.target == "verify";
            while let Some((due, i)) = rx.recv().await {
                let request = request_bytes(&args, i);
                let ok = match stream.write_all(&request).await {
                    Ok(()) => read_response(&mut stream, &mut buf, verify)
                        .await
                        .unwrap_or(false),
                    Err(_) => false,
                };
                let _ = results.send(ok.then(|| due.elapsed()));
            }
        });
        lanes.push(tx);
    }
    drop(results_tx);
    let interval = Duration::from_nanos(1_000_000_000 / args.rate);
    for i in 0..count {
        let due = start + interval * u32::try_from(i).expect("bounded count");
        // Wait for the due time without the timer wheel's millisecond granularity: yield
        // to the connections until then (the load generator owns its core).
        while Instant::now() < due {
            tokio::task::yield_now().await;
        }
        let _ = lanes[i as usize % CONNECTIONS].send((due, i as usize));
    }
    drop(lanes);
    let mut latencies = Vec::with_capacity(count as usize);
    while let Some(latency) = results_rx.recv().await {
        latencies.push(latency);
    }
    latencies
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
        // Warm up: keys cached, server warm, not recorded.
        let warmup = args.rate * args.warmup_seconds;
        if warmup > 0 {
            run(&args, Instant::now(), warmup).await;
        }
        let count = args.rate * args.seconds;
        let start = Instant::now() + Duration::from_millis(50);
        let results = run(&args, start, count).await;
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
