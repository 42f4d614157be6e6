#!/usr/bin/env bash
# The test command: installs what the build needs, starts the real Kafka broker, the
# three-broker cluster and the real PostgreSQL (deploy/local/*.sh), checks formatting and
# lints, then runs every test target.
#
#   deploy/local/test.sh            everything
#   deploy/local/test.sh -- ARGS    extra arguments for `cargo test` (e.g. a test name filter)
#
# CARGO_TARGET_DIR defaults to ~/.cache/product-sync/target so fresh clones on the same
# machine reuse compiled dependencies.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

say() { echo "test.sh: $*" >&2; }
t0=$(date +%s)

# Native build dependencies of rdkafka (librdkafka, OpenSSL, zlib) and the C toolchain.
missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
[ -f /usr/include/zlib.h ] || missing+=(zlib1g-dev)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { say "missing build packages: ${missing[*]} (install them with apt-get)"; exit 1; }
  say "installing build packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null 2>&1 || { say "cargo is missing: install the Rust toolchain (rustup) first"; exit 1; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/product-sync/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

deploy/local/kafka.sh up
# The three-node cluster with SASL_SSL listeners: the TLS tests (tests/integration/tls.rs).
deploy/local/kafka.sh up --brokers 3
deploy/local/postgres.sh up
deploy/local/browser.sh up
t_services=$(date +%s)
say "services ready after $((t_services - t0)) s"

# promtool (the alerting rules' unit tests) and helm (the chart): built once per machine
# (minutes: downloads and Go compilation), in the background while Rust compiles.
tools_log="$(mktemp)"
deploy/local/tools.sh up >"$tools_log" 2>&1 &
tools_pid=$!

# mdBook for the book under docs/: a cargo build, so not beside the project's own.
deploy/local/tools.sh mdbook

# Drop the databases earlier test runs left behind (each test makes its own).
pg_url="$(deploy/local/postgres.sh url)"
stale=$(psql "$pg_url" -tAc "SELECT datname FROM pg_database WHERE datname LIKE 'ps\_test\_%'" 2>/dev/null || true)
for db in $stale; do psql "$pg_url" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true; done

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# The production build (no simulator, demo or chaos run) must build clean on its own.
cargo clippy --no-default-features --locked -- -D warnings
t_lint=$(date +%s)
say "format and lints clean after $((t_lint - t0)) s"

if ! wait "$tools_pid"; then cat "$tools_log" >&2; say "building promtool or helm failed"; exit 1; fi
deploy/local/tools.sh check
deploy/local/tools.sh book
say "alerting rules unit-tested, chart linted, book built after $(($(date +%s) - t0)) s"

extra=()
if [ "${1:-}" = "--" ]; then shift; extra=("$@"); fi
cargo test --all-targets --locked "${extra[@]}"
say "all tests passed in $(($(date +%s) - t0)) s"
