#!/usr/bin/env bash
# The chaos run: real broker, real PostgreSQL, the simulator, three `product-sync run`
# processes, faults on a seeded schedule; ends with one `chaos: seed=… lost=… …` line and
# exits non-zero when anything was lost, doubled, left with a gap, stalled or leaked.
#
#   deploy/local/chaos.sh [--short] [--cluster] [--seed S]
#
# --short: 5,000 products and about three minutes of faults (CI-sized); otherwise 50,000
# products and fifteen minutes.
# --cluster: the three-broker cluster (topics with replication factor 3, min.insync.replicas
# 2), every link of the instances behind Toxiproxy; adds kill -9 of partition leaders and
# network faults (latency, bandwidth limits, connections reset, black holes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/product-sync/target}"
deploy/local/kafka.sh up
deploy/local/postgres.sh up
for arg in "$@"; do
  if [ "$arg" = --cluster ]; then
    deploy/local/kafka.sh up --brokers 3
    deploy/local/toxiproxy.sh up
  fi
done
cargo build --release --locked --bins
exec "$CARGO_TARGET_DIR/release/product-sync-chaos" --repo "$PWD" "$@"
