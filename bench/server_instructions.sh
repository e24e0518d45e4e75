#!/usr/bin/env bash
# Instructions per request of the whole load server (hyper, axum, the layer, the handler)
# under callgrind, for one or more variants: exact and repeatable, unlike CPU time on a shared
# machine. Only hyper's HTTP/1 connection task is collected (`--toggle-collect` on
# `Dispatcher::poll_catch`, which parses the request, calls axum and the layer, and writes the
# response); the accept loop and the I/O driver are not, and they are the same for every
# variant. Valgrind runs the server ~50x slower; only the count matters.
#
# Usage: bench/server_instructions.sh bare keywarden-hit keywarden-malformed
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
bin="$target_dir/release/examples/loadserver"
work=$(mktemp -d -t keywarden-cg-XXXXXX)
port=3291
echo "| variant | requests | instructions per request |"
echo "| --- | ---: | ---: |"
for variant in "$@"; do
    out="$work/$variant.callgrind"
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        '--toggle-collect=hyper::proto::h1::dispatch::Dispatcher*poll_catch' \
        "$bin" --variant "$variant" --addr "127.0.0.1:$port" --keys-file "$work/$variant.keys" \
        --dir "$work" > "$work/$variant.stdout" 2> "$work/$variant.valgrind" &
    pid=$!
    until grep -q ready "$work/$variant.stdout" 2>/dev/null; do sleep 1; done
    requests=$(KEYS_FILE="$work/$variant.keys" wrk -t1 -c1 -d10s -s bench/wrk.lua "http://127.0.0.1:$port/" \
        | sed -n 's/^WRKJSON //p' | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
    kill -TERM "$pid"
    wait "$pid" || true
    total=$(grep -h "^totals:" "$out"* | awk "{s += \$2} END {print s}")
    echo "| $variant | $requests | $((total / requests)) |"
    port=$((port + 1))
done
echo "$work" >&2
