#!/usr/bin/env bash
# Mutation testing of the security-critical files with cargo-mutants: each mutant (an
# operator flipped, a body replaced by a constant, a match arm deleted...) must make a test
# fail. A mutant that survives is an untested decision, or an equivalent change listed in
# SECURITY.md.
#
#   scripts/mutants.sh                    # every file below, one at a time
#   scripts/mutants.sh scope secret       # only these (names from the table below)
#   scripts/mutants.sh --list             # the files and the tests each is checked with
#   MUTANTS_JOBS=2 scripts/mutants.sh key # parallel mutants: NOT reliable, every job builds
#                                         # into the same build dir (seen: bogus MISSED);
#                                         # keep the default of 1
#   MUTANTS_ARGS="--re decode_hex" scripts/mutants.sh secret   # extra cargo-mutants options
#   MUTANTS_BASELINE=skip scripts/mutants.sh secret   # tests known to pass: skip the
#                                         # unmutated run (tests then time out at 300 s)
#   MUTANTS_LIB_ONLY=1 scripts/mutants.sh credential  # two passes, for a whole file in less
#   MUTANTS_ARGS=--iterate scripts/mutants.sh credential  # time: the unit tests alone first,
#                                         # then the suites only on what they missed
#                                         # (--iterate skips what the last pass caught)
#
# Too slow for .ci/run: every mutant is a rebuild of the crate. To stay affordable on two
# cores each file is tested with the unit tests (`--lib`) plus the few integration suites
# that cover it, not the whole suite. Results: target/mutants/<name>/mutants.out/
# (caught.txt, missed.txt, timeout.txt, unviable.txt, outcomes.json). The exit status is
# cargo-mutants' (0: every viable mutant caught; 2: some missed; 3: timeouts), the worst
# over the files run.
#
# The build dir keeps the last mutant's build, and cargo may take it as fresh for the real
# tree: do not point another `cargo test` at it without touching the sources first.
#
# The suites marked (pg) need PostgreSQL: set KEYWARDEN_TEST_POSTGRES_URL, or they skip
# their tests and the postgres store's mutants survive.
set -euo pipefail

version=27.1.0
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# name | file | integration suites run besides the unit tests
table=(
    "net|src/net.rs|ip_allowlist"
    "clients|src/ratelimit/clients.rs|ip_allowlist ratelimit verify_api"
    "scope|src/scope.rs|require_scope"
    "principal|src/principal.rs|require_scope"
    "secret|src/secret.rs|"
    "credential|src/credential.rs|adversarial"
    "key|src/key.rs|"
    "verify|src/verify/*.rs|layer one_layer ratelimit verify_api ip_allowlist interop coalescing secret_rotation outage (pg)"
    "service|src/layer/service.rs|layer require_scope one_layer ratelimit"
    "manage_policy|src/manage/policy/*.rs|management_api management_escalation ip_allowlist"
    "manage_http|src/manage/http/*.rs|management_api openapi audit usage_analytics webhooks"
    "sqlite|src/store/sqlite.rs|store_conformance audit reveal usage_analytics webhooks"
    "postgres|src/store/postgres.rs|store_conformance audit reveal usage_analytics webhooks (pg)"
    "sql|src/store/sql.rs|store_conformance credits owner_policies (pg)"
    "credits|src/credits.rs|credits owner_policies"
    "store_credits|src/store/credits.rs|store_conformance credits"
    "owners|src/store/owners.rs src/manage/owners.rs src/manage/http/owners.rs|owner_policies store_conformance (pg)"
)

if [[ "${1:-}" == "--list" ]]; then
    for row in "${table[@]}"; do
        IFS='|' read -r name file tests <<<"$row"
        printf '%-14s %-22s --lib %s\n' "$name" "$file" "$tests"
    done
    exit 0
fi

if ! cargo mutants --version 2>/dev/null | grep -qF "$version"; then
    cargo install cargo-mutants --locked --version "$version"
fi

# One build directory for every run, outside the copied tree, so dependencies are built once
# and later runs rebuild only keywarden.
export CARGO_TARGET_DIR="${MUTANTS_TARGET_DIR:-$root/target/mutants/build}"
# No debugger ever reads these builds, and debug info is much of each rebuild's compile and
# link time.
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-0}"
jobs="${MUTANTS_JOBS:-1}"
baseline=(--baseline "${MUTANTS_BASELINE:-run}")
if [[ "${MUTANTS_BASELINE:-run}" == skip ]]; then
    baseline+=(--timeout 300)
fi
status=0
wanted=("$@")

for row in "${table[@]}"; do
    IFS='|' read -r name file tests <<<"$row"
    if ((${#wanted[@]})) && [[ ! " ${wanted[*]} " == *" $name "* ]]; then
        continue
    fi
    # --cargo-arg, not --cargo-test-arg: cargo-mutants passes the latter only to the test
    # run, and its build step (`cargo test --no-run`) would then build every test target.
    args=(--cargo-arg=--lib)
    if [[ -n "${MUTANTS_LIB_ONLY:-}" ]]; then
        tests=""
    fi
    for suite in ${tests/(pg)/}; do
        args+=("--cargo-arg=--test=$suite")
    done
    files=()
    for f in $file; do
        files+=(--file "$f")
    done
    echo "== $name: $file (--lib ${tests})"
    mkdir -p "target/mutants/$name"
    result=0
    nice cargo mutants \
        "${files[@]}" \
        --all-features \
        --jobs "$jobs" \
        --output "target/mutants/$name" \
        --no-shuffle \
        --minimum-test-timeout 60 \
        "${baseline[@]}" \
        ${MUTANTS_ARGS:-} \
        "${args[@]}" || result=$?
    if ((result > status)); then
        status=$result
    fi
done
exit "$status"
