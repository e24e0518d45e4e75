#!/usr/bin/env bash
# Latency of `keywarden serve`'s verification API at a steady load, cached keys, on loopback.
#
#   bench/verify_latency.sh [RATE...]        default: 1000 5000 10000 requests per second
#
# Builds the release binary and the open-loop load generator (examples/verify_latency.rs),
# creates a secret, a caller key with `keys:verify` and 100 keys in a temporary SQLite
# database, starts `keywarden serve` pinned to CPU 0 and the generator pinned to CPU 1, and
# for each rate runs `GET /healthz` (the HTTP round trip alone: the baseline) and
# `POST /v1/keys/verify` alternately, ROUNDS times each (default 3), 10 s each after a 2 s
# warm-up. Prints one JSON line per run and a summary with medians. Loopback only; the server
# is stopped by its pid at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

rates=("$@")
if ((${#rates[@]} == 0)); then
    rates=(1000 5000 10000)
fi
rounds="${ROUNDS:-3}"
seconds="${SECONDS_PER_RUN:-10}"

cargo build --release --features cli --bin keywarden >&2
cargo build --release --all-features --example verify_latency >&2
target_dir="${CARGO_TARGET_DIR:-target}"
bin="$target_dir/release/keywarden"
gen="$target_dir/release/examples/verify_latency"

work="$(mktemp -d -t keywarden-latency-XXXXXX)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

export KEYWARDEN_DATABASE_URL="sqlite://$work/keys.db"
KEYWARDEN_SECRET="$("$bin" secret generate)"
export KEYWARDEN_SECRET
unset KEYWARDEN_REDIS_URL KEYWARDEN_CONFIG

caller="$("$bin" keys create --json --name caller --subject gateway --owner-kind service \
    --scope keys:verify | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')"
for i in $(seq 1 100); do
    "$bin" keys create --json --name "k$i" --subject "user$i" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
done >"$work/keys.txt"

pin() { if command -v taskset >/dev/null; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }

# Started directly (not through a shell function, which would background a subshell whose
# pid is not the server's), so the trap stops the server itself.
if command -v taskset >/dev/null; then
    taskset -c 0 "$bin" serve --addr 127.0.0.1:0 >"$work/serve.out" 2>"$work/serve.err" &
else
    "$bin" serve --addr 127.0.0.1:0 >"$work/serve.out" 2>"$work/serve.err" &
fi
server_pid=$!
for _ in $(seq 1 100); do
    grep -q '^listening on ' "$work/serve.out" 2>/dev/null && break
    sleep 0.1
done
url="$(sed -n 's/^listening on //p' "$work/serve.out")"
[[ -n "$url" ]] || { cat "$work/serve.err" >&2; exit 1; }

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
echo "server: keywarden serve (release) on CPU 0, SQLite, 100 cached keys; generator on CPU 1"
results="$work/results.jsonl"
for rate in "${rates[@]}"; do
    for round in $(seq 1 "$rounds"); do
        for target in healthz verify; do
            pin 1 "$gen" --url "$url" --target "$target" --rate "$rate" --seconds "$seconds" \
                --caller-key "$caller" --keys-file "$work/keys.txt" | tee -a "$results"
        done
    done
done

python3 - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print()
print("| rate/s | target | achieved/s | p50 µs | p90 µs | p99 µs | p99.9 µs | failures |")
print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for rate in sorted({r["rate"] for r in runs}):
    for target in ("healthz", "verify"):
        rs = [r for r in runs if r["rate"] == rate and r["target"] == target]
        med = lambda k: statistics.median(r[k] for r in rs)
        print(f"| {rate} | {target} | {med('achieved_rate'):.0f} | {med('p50_us'):.0f} | "
              f"{med('p90_us'):.0f} | {med('p99_us'):.0f} | {med('p999_us'):.0f} | "
              f"{sum(r['failures'] for r in rs)} |")
PY
