#!/usr/bin/env bash
# Runs every test suite: unit, integration, doctests, and the PostgreSQL-backed suites.
#
# Starts the local PostgreSQL and Redis if they are installed but not running, and points the
# service-backed suites at them. Without a reachable PostgreSQL those suites print why they skip;
# under CI=true they fail instead, so a skipped suite can never pass CI silently.
set -euo pipefail
cd "$(dirname "$0")/.."

export KEYWARDEN_TEST_POSTGRES_URL="${KEYWARDEN_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
export KEYWARDEN_TEST_REDIS_URL="${KEYWARDEN_TEST_REDIS_URL:-redis://127.0.0.1:6379}"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
  for _ in $(seq 1 60); do
    port_open "$1" && return 0
    sleep 0.5
  done
  return 1
}

if ! port_open 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "test.sh: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
    wait_for_port 5432 || echo "test.sh: PostgreSQL did not come up"
  fi
fi
if ! port_open 6379; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "test.sh: starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
    wait_for_port 6379 || echo "test.sh: Redis did not come up"
  fi
fi

if port_open 5432; then
  # The suites create their own schemas; the database itself must exist.
  if command -v psql >/dev/null 2>&1 && ! psql "$KEYWARDEN_TEST_POSTGRES_URL" -qAtc 'select 1' >/dev/null 2>&1; then
    echo "test.sh: creating the test database"
    psql "${KEYWARDEN_TEST_POSTGRES_URL%/*}/postgres" -qc 'create database test' || true
  fi
else
  echo "test.sh: PostgreSQL is not reachable on 127.0.0.1:5432: its suites will skip (or fail under CI=true)"
  unset KEYWARDEN_TEST_POSTGRES_URL
fi
if ! port_open 6379; then
  echo "test.sh: Redis is not reachable on 127.0.0.1:6379"
  unset KEYWARDEN_TEST_REDIS_URL
fi

exec cargo test --all-features
