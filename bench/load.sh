#!/usr/bin/env bash
# The load harness: builds the loadserver example, installs wrk if missing, and runs
# bench/load.py (server and wrk pinned to different cores, strictly alternating bare/variant
# runs, server CPU time per request from /proc, rounds until the median ratios are stable).
#
# Usage: bench/load.sh [load.py options]   e.g. bench/load.sh --variants bare,keywarden-hit
# Needs PostgreSQL for keywarden-postgres-nocache (KEYWARDEN_TEST_POSTGRES_URL, default
# postgres://postgres@127.0.0.1:5432/test); leave that variant out with --variants otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null 2>&1; then
    echo "installing wrk" >&2
    apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi
command -v taskset >/dev/null 2>&1 || echo "taskset missing: server and client will not be pinned" >&2

cargo build --release --all-features --example loadserver >&2
target_dir="${CARGO_TARGET_DIR:-target}"
results="${LOAD_RESULTS:-$(mktemp -t keywarden-load-XXXXXX.json)}"

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
exec python3 bench/load.py --binary "$target_dir/release/examples/loadserver" --json "$results" "$@"
