#!/usr/bin/env bash
# Toxiproxy (Shopify's, built once from its Go module by deploy/local/tools.sh) between
# product-sync and the three-broker cluster and PostgreSQL, for the cluster chaos run's network
# faults: latency, bandwidth limits, connections reset, traffic black-holed.
#
#   deploy/local/toxiproxy.sh up      build if needed, start the server, create the proxies
#   deploy/local/toxiproxy.sh down    stop the server this script started
#   deploy/local/toxiproxy.sh status  say whether it answers, list the proxies
#
# Proxies (the chaos run adds one for its simulator through the same API):
#   kafka-<i>  127.0.0.1:(KAFKA_CLUSTER_PORT + 10(i-1) + 4) -> the node's PROXIED listener (+ 3),
#              which advertises the proxy's port: clients bootstrapping there stay behind it
#   postgres   127.0.0.1:TOXI_PG_PORT (default 15432) -> 127.0.0.1:PG_PORT (default 5432)
#
# Environment:
#   PRODUCT_SYNC_CACHE  where the binary and the server's log live (default ~/.cache/product-sync)
#   TOXIPROXY_PORT      the HTTP API (default 8474)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${PRODUCT_SYNC_CACHE:-$HOME/.cache/product-sync}"
api_port="${TOXIPROXY_PORT:-8474}"
api="http://127.0.0.1:$api_port"
cluster_port="${KAFKA_CLUSTER_PORT:-19092}"
pg_port="${PG_PORT:-5432}"
toxi_pg_port="${TOXI_PG_PORT:-15432}"
state="$cache/toxiproxy-run"
pidfile="$state/toxiproxy.pid"
logfile="$state/toxiproxy.log"

say() { echo "toxiproxy.sh: $*" >&2; }
die() { say "$*"; exit 1; }

answers() { curl -fsS --max-time 2 "$api/version" >/dev/null 2>&1; }

running_pid() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid="$(cat "$pidfile")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-port $api_port" || return 1
  echo "$pid"
}

# Creates proxy $1 (listen $2 -> upstream $3), or replaces one of that name (POST /populate).
proxy() {
  curl -fsS --max-time 5 -X POST "$api/populate" -H 'Content-Type: application/json' \
    -d "[{\"name\":\"$1\",\"listen\":\"$2\",\"upstream\":\"$3\",\"enabled\":true}]" >/dev/null \
    || die "could not create proxy $1 ($2 -> $3)"
}

up() {
  command -v curl >/dev/null 2>&1 || die "curl is missing: apt-get install curl"
  local bin
  bin="$("$here/tools.sh" path toxiproxy)"
  mkdir -p "$state"
  local pid
  if ! pid="$(running_pid)"; then
    answers && die "127.0.0.1:$api_port already answers as a Toxiproxy this script did not start; stop it or set TOXIPROXY_PORT"
    say "starting Toxiproxy on 127.0.0.1:$api_port (log: $logfile)"
    nohup "$bin" -host 127.0.0.1 -port "$api_port" >>"$logfile" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$pidfile"
  fi
  local deadline=$(($(date +%s) + 30))
  until answers; do
    # Whether it still lives, not what its command line says: right after the start the child
    # may not have executed the binary yet (its command line is still this script's).
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$logfile" >&2; die "Toxiproxy exited during start-up"; }
    [ "$(date +%s)" -lt "$deadline" ] || die "Toxiproxy did not answer on $api within 30 s"
    sleep 0.2
  done
  local i port
  for i in 1 2 3; do
    port=$((cluster_port + 10 * (i - 1)))
    proxy "kafka-$i" "127.0.0.1:$((port + 4))" "127.0.0.1:$((port + 3))"
  done
  proxy postgres "127.0.0.1:$toxi_pg_port" "127.0.0.1:$pg_port"
  say "ready on $api: kafka-1..3, postgres"
}

down() {
  local pid
  if pid="$(running_pid)"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    say "stopped"
  else
    say "not running"
  fi
  rm -f "$pidfile"
}

status() {
  if answers; then
    echo "toxiproxy: answering on $api"
    curl -fsS --max-time 2 "$api/proxies"; echo
  else
    echo "toxiproxy: not running (start it with deploy/local/toxiproxy.sh up)"
    return 3
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
