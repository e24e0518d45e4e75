#!/usr/bin/env bash
# Instructions per request of the whole load server (hyper, axum, the layer, the handler)
# under callgrind, for one or more variants: exact and repeatable, unlike CPU time on a shared
# machine. Only the HTTP connection task is collected (`--toggle-collect` on
# `UpgradeableConnection::poll`, hyper-util's connection future: it parses the request, calls
# axum and the layer, and writes the response); the accept loop and the I/O driver are not,
# and they are the same for every variant. Valgrind runs the server ~50x slower; only the
# count matters.
#
# Usage: bench/server_instructions.sh bare keywarden-hit keywarden-malformed
# KEY_HEADER=x-api-key sends the key in `X-Api-Key` (needed by the handwritten variants);
# SECONDS_PER_RUN (default 10) sets the length of the counted run, WARMUP_SECONDS (default 5)
# that of the uncounted warm-up before it; LOADSERVER the binary; LOADSERVER_ARGS more
# loadserver arguments (e.g. `--credit-block 1000000000`).
#
# The collected function must exist as a symbol: hyper inlines much of its dispatcher (an
# earlier pattern, `Dispatcher::poll_catch`, matched nothing and reported 0), so the script
# fails rather than print a count of nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
bin="${LOADSERVER:-$target_dir/release/examples/loadserver}"
toggle='<hyper_util::server::conn::auto::UpgradeableConnection*as core::future::future::Future>::poll'
if ! nm -C "$bin" | grep 'UpgradeableConnection<I,S,E> as core::future::future::Future>::poll' > /dev/null; then
    echo "server_instructions.sh: no UpgradeableConnection::poll symbol in $bin: update the toggle" >&2
    exit 1
fi
work=$(mktemp -d -t keywarden-cg-XXXXXX)
port=3291
echo "| variant | requests | instructions per request |"
echo "| --- | ---: | ---: |"
for variant in "$@"; do
    out="$work/$variant.callgrind"
    valgrind --tool=callgrind --callgrind-out-file="$out" "--toggle-collect=$toggle" \
        "$bin" --variant "$variant" --addr "127.0.0.1:$port" --keys-file "$work/$variant.keys" \
        --cache-ttl 3600 --dir "$work" ${LOADSERVER_ARGS:-} > "$work/$variant.stdout" 2> "$work/$variant.valgrind" &
    pid=$!
    until grep -q ready "$work/$variant.stdout" 2>/dev/null; do sleep 1; done
    # One warm-up pass over the keys (first uses are cache misses), not counted.
    KEYS_FILE="$work/$variant.keys" KEY_HEADER="${KEY_HEADER:-bearer}" wrk -t1 -c1 -d"${WARMUP_SECONDS:-5}"s \
        -s bench/wrk.lua "http://127.0.0.1:$port/" > /dev/null
    callgrind_control -z "$pid" > /dev/null
    requests=$(KEYS_FILE="$work/$variant.keys" KEY_HEADER="${KEY_HEADER:-bearer}" \
        wrk -t1 -c1 -d"${SECONDS_PER_RUN:-10}"s -s bench/wrk.lua "http://127.0.0.1:$port/" \
        | sed -n 's/^WRKJSON //p' | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
    kill -TERM "$pid"
    wait "$pid" || true
    total=$(grep -h "^totals:" "$out"* | awk '{s += $2} END {print s}')
    if [ "${total:-0}" -eq 0 ]; then
        echo "server_instructions.sh: $variant: nothing collected (see $work)" >&2
        exit 1
    fi
    echo "| $variant | $requests | $((total / requests)) |"
    port=$((port + 1))
done
echo "$work" >&2
