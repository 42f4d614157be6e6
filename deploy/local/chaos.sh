#!/usr/bin/env bash
# The chaos run: real broker, real PostgreSQL, the simulator, three `product-sync run`
# processes, faults on a seeded schedule; ends with one `chaos: seed=… lost=… …` line and
# exits non-zero when anything was lost, doubled, left with a gap, stalled or leaked.
#
#   deploy/local/chaos.sh [--short] [--seed S]
#
# --short: 5,000 products and about three minutes of faults (CI-sized); otherwise 50,000
# products and fifteen minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/product-sync/target}"
deploy/local/kafka.sh up
deploy/local/postgres.sh up
cargo build --release --locked --bins
exec "$CARGO_TARGET_DIR/release/product-sync-chaos" --repo "$PWD" "$@"
