#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a bounded number of executions or time.
#
#   scripts/fuzz.sh                      # every target, FUZZ_RUNS executions each
#   FUZZ_RUNS=10000000 scripts/fuzz.sh layer
#   FUZZ_TIME=60 scripts/fuzz.sh         # at most 60 s per target instead
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). The toolchain is stable, so nightly-only
# flags are unlocked with RUSTC_BOOTSTRAP=1. Targets run one at a time under `nice`, with
# the checked-in seeds (fuzz/seeds/<target>) and a local corpus (fuzz/corpus/<target>,
# ignored by git). A crash leaves its input in fuzz/artifacts/<target>/ and fails the script.
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-target}}"
runs="${FUZZ_RUNS:-1000000}"
time_limit="${FUZZ_TIME:-0}"
sanitizer="${FUZZ_SANITIZER:-none}"
all=(credential key layer manage_api)
targets=("${@:-${all[@]}}")

dict_for() {
    case "$1" in
        credential | layer) echo dict/headers.dict ;;
        key) echo dict/key.dict ;;
        manage_api) echo dict/manage_api.dict ;;
    esac
}

for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    args=(-runs="$runs" -dict="$(dict_for "$target")" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048)
    if [[ "$time_limit" != 0 ]]; then
        args+=(-max_total_time="$time_limit")
    fi
    echo "== $target: ${args[*]}"
    nice -n 15 cargo fuzz run --release -s "$sanitizer" "$target" \
        "corpus/$target" "seeds/$target" -- "${args[@]}"
done
