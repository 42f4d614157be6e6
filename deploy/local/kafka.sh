#!/usr/bin/env bash
# Runs real Apache Kafka brokers (KRaft, no ZooKeeper, no Docker) from the official jars on
# Maven Central, for local development and the test suite: one broker, or a three-node cluster
# shaped like production (replication factor 3, min.insync.replicas 2, SASL_SSL listeners).
#
#   deploy/local/kafka.sh up       fetch jars (cached), format storage, start, wait until ready
#   deploy/local/kafka.sh up --fresh   the same from empty storage (a running broker is stopped
#                                  first): every test world leaves its topics behind, and a
#                                  broker reused across many runs ran out of its heap
#   deploy/local/kafka.sh down     stop the broker this script started (TERM, then KILL)
#   deploy/local/kafka.sh status   say whether it runs and answers
#   deploy/local/kafka.sh logs [N] print the tail of the broker log
#
# Each command takes `--brokers 3` for the cluster, which runs beside the single broker:
# node i (1..3) listens on PLAINTEXT 127.0.0.1:(KAFKA_CLUSTER_PORT + 10*(i-1)), its controller
# on that port + 1, SASL_SSL (SCRAM-SHA-512, the certificate of deploy/local/tls.sh) on
# that port + 2, and a plaintext listener on + 3 that advertises + 4, where
# deploy/local/toxiproxy.sh puts its proxy (clients bootstrapping there stay behind the
# proxies). `up --brokers 3` also creates the SCRAM user and writes client.properties
# (bootstrap lists, CA, user, password file) into the cluster's directory for the tests.
#
# Environment:
#   PRODUCT_SYNC_CACHE   where jars and broker state live (default ~/.cache/product-sync)
#   KAFKA_PORT           client port of the single broker (default 9092; controller: +1)
#   KAFKA_CLUSTER_PORT   first client port of the cluster (default 19092)
#   KAFKA_HEAP_OPTS      JVM heap per broker (default -Xms512m -Xmx512m; cluster: 384m each)
#   KAFKA_READY_TIMEOUT_S  how long `up` waits for a real Kafka request to succeed (default 120)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${PRODUCT_SYNC_CACHE:-$HOME/.cache/product-sync}"
single_port="${KAFKA_PORT:-9092}"
cluster_port="${KAFKA_CLUSTER_PORT:-19092}"
ready_timeout="${KAFKA_READY_TIMEOUT_S:-120}"
scram_user=product-sync

pom="$here/kafka/pom.xml"
kafka_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
jars="$cache/kafka-$kafka_version/libs"

say() { echo "kafka.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# The nodes this invocation manages: 1 (the single broker) or 3 (the cluster).
brokers=1
cluster_dir="$cache/kafka-cluster-$cluster_port"

# Sets port, ctl_port, ssl_port, state, data, pidfile, logfile, props, log4j of node $1.
node() {
  if [ "$brokers" = 1 ]; then
    port="$single_port"
    state="$cache/kafka-run-$port"
  else
    port=$((cluster_port + 10 * ($1 - 1)))
    state="$cluster_dir/node-$1"
  fi
  ctl_port=$((port + 1))
  ssl_port=$((port + 2))
  data="$state/data"
  pidfile="$state/kafka.pid"
  logfile="$state/kafka.log"
  props="$state/server.properties"
  log4j="$state/log4j2.properties"
}

nodes() { seq 1 "$brokers"; }

# The PLAINTEXT bootstrap list of the nodes managed.
plain_bootstrap() {
  local list="" i
  for i in $(nodes); do node "$i"; list="$list${list:+,}127.0.0.1:$port"; done
  echo "$list"
}

heap() {
  if [ -n "${KAFKA_HEAP_OPTS:-}" ]; then echo "$KAFKA_HEAP_OPTS"
  elif [ "$brokers" = 1 ]; then echo "-Xms512m -Xmx512m"
  else echo "-Xms256m -Xmx384m"; fi
}

apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    die "$1 is missing and apt-get is not available: install $2 by hand and run again"
  fi
  [ "$(id -u)" = 0 ] || die "$1 is missing: run as root (or sudo apt-get install $2) and try again"
  say "$1 is missing: installing Debian package(s) $2"
  if [ ! -f "$cache/.apt-updated" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    mkdir -p "$cache" && touch "$cache/.apt-updated"
  fi
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $2 >&2
}

java_major() {
  java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1
}

ensure_tools() {
  # A JDK, not only a JRE: the readiness probe runs as a single-file Java source program.
  if ! command -v javac >/dev/null 2>&1 || [ "$(java_major)" -lt 17 ] 2>/dev/null; then
    apt_install "java 17+ (JDK)" "openjdk-17-jdk-headless"
  fi
  if [ ! -f "$jars/.complete" ] && ! command -v mvn >/dev/null 2>&1; then
    apt_install "mvn" "maven"
  fi
  if [ "$brokers" != 1 ] && ! command -v openssl >/dev/null 2>&1; then
    apt_install "openssl" "openssl"
  fi
}

fetch_jars() {
  [ -f "$jars/.complete" ] && return 0
  say "fetching Apache Kafka $kafka_version jars from Maven Central into $jars"
  rm -rf "$jars" && mkdir -p "$jars"
  mvn -B -q -Dstyle.color=never -f "$pom" \
    org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$jars" >&2 \
    || die "could not fetch the Kafka jars with Maven (is Maven Central reachable?)"
  ls "$jars"/kafka_2.13-*.jar >/dev/null 2>&1 || die "Maven ran but no kafka_2.13 jar arrived in $jars"
  touch "$jars/.complete"
}

# The pid of node $1 when it runs (the current node's variables are set).
running_pid() {
  node "$1"
  [ -f "$pidfile" ] || return 1
  local pid
  pid="$(cat "$pidfile")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # Only our broker: the PID must still be a java process started with our properties file.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$props" || return 1
  echo "$pid"
}

# Properties of node $1, single or cluster.
write_config() {
  node "$1"
  mkdir -p "$data"
  if [ "$brokers" = 1 ]; then
    cat >"$props" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$ctl_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctl_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
EOF
  else
    local voters="" i tls
    for i in 1 2 3; do voters="$voters${voters:+,}$i@127.0.0.1:$((cluster_port + 10 * (i - 1) + 1))"; done
    tls="$("$here/tls.sh" dir)"
    cat >"$props" <<EOF
process.roles=broker,controller
node.id=$1
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctl_port,SASL_SSL://127.0.0.1:$ssl_port,PROXIED://127.0.0.1:$((port + 3))
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_SSL://127.0.0.1:$ssl_port,PROXIED://127.0.0.1:$((port + 4))
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,PROXIED:PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$tls/server.p12
ssl.keystore.password=$(cat "$tls/keystore.password")
ssl.key.password=$(cat "$tls/keystore.password")
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
EOF
    chmod 600 "$props"
  fi
  cat >>"$props" <<EOF
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$data
num.partitions=1
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
auto.create.topics.enable=false
delete.topic.enable=true
log.retention.hours=24
EOF
  printf 'status = error\nrootLogger.level = off\n' >"$state/probe-log4j2.properties"
  cat >"$log4j" <<EOF
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.kafka.name = kafka
logger.kafka.level = info
logger.state.name = state.change.logger
logger.state.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
EOF
}

java_cp() { echo "$jars/*"; }

quiet_java() {
  java -Xmx128m -cp "$(java_cp)" -Dlog4j2.configurationFile="$state/probe-log4j2.properties" "$@"
}

# A real Kafka request (DescribeCluster through Kafka's Admin client), not a port check: every
# managed node must be in the answer.
probe() {
  local out
  out="$(timeout 30 java -Xmx128m -cp "$(java_cp)" \
    -Dlog4j2.configurationFile="$cache/kafka-probe-log4j2.properties" \
    "$here/kafka/Probe.java" "$(plain_bootstrap)" 2>/dev/null)" || return 1
  [ "${out#nodes=}" -ge "$brokers" ] 2>/dev/null
}

cluster_id() {
  local file="$cache/kafka-run-$single_port/cluster-id"
  [ "$brokers" = 1 ] || file="$cluster_dir/cluster-id"
  mkdir -p "$(dirname "$file")"
  [ -f "$file" ] || java -cp "$(java_cp)" -Dlog4j2.configurationFile="$log4j" \
    kafka.tools.StorageTool random-uuid >"$file" 2>/dev/null
  cat "$file"
}

# Formats (when new) and starts node $1 unless it runs.
start_node() {
  local pid p
  node "$1"
  if pid="$(running_pid "$1")"; then
    say "node $1 already running (pid $pid) on 127.0.0.1:$port"
    return 0
  fi
  # A port held by another process (another broker, or one started with another
  # PRODUCT_SYNC_CACHE) would answer the readiness probe while ours fails to bind.
  for p in "$port" "$ctl_port" $([ "$brokers" = 1 ] || echo "$ssl_port $((port + 3))"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      die "127.0.0.1:$p is already taken by a process this script did not start (pid file: $pidfile); stop it, or choose other ports with KAFKA_PORT / KAFKA_CLUSTER_PORT"
    fi
  done
  java -cp "$(java_cp)" -Dlog4j2.configurationFile="$log4j" kafka.tools.StorageTool format \
    -t "$(cluster_id)" -c "$props" --ignore-formatted >>"$logfile" 2>&1 \
    || { tail -n 30 "$logfile" >&2; die "formatting storage in $data failed (log above)"; }
  say "starting node $1 ($kafka_version) on 127.0.0.1:$port (heap: $(heap), log: $logfile)"
  # shellcheck disable=SC2046
  nohup java $(heap) -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$log4j" -cp "$(java_cp)" kafka.Kafka "$props" \
    >>"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
}

# What the tests need to reach the cluster's SASL_SSL listeners.
write_client_properties() {
  local tls list="" i
  tls="$("$here/tls.sh" dir)"
  for i in $(nodes); do node "$i"; list="$list${list:+,}127.0.0.1:$ssl_port"; done
  local proxied=""
  for i in $(nodes); do node "$i"; proxied="$proxied${proxied:+,}127.0.0.1:$((port + 4))"; done
  cat >"$cluster_dir/client.properties" <<EOF
plaintext.bootstrap=$(plain_bootstrap)
proxied.bootstrap=$proxied
sasl_ssl.bootstrap=$list
ssl.ca.location=$tls/ca.pem
sasl.username=$scram_user
sasl.password.file=$cluster_dir/scram.password
EOF
}

up() {
  local fresh=""
  [ "${1:-}" = "--fresh" ] && fresh=1
  ensure_tools
  fetch_jars
  printf 'status = error\nrootLogger.level = off\n' >"$cache/kafka-probe-log4j2.properties"
  if [ "$brokers" != 1 ]; then "$here/tls.sh" up; fi
  local i
  if [ -n "$fresh" ]; then
    down
    for i in $(nodes); do
      node "$i"
      say "fresh: removing node $i's storage and log ($state)"
      rm -rf "$data" "$logfile"
    done
  fi
  for i in $(nodes); do
    node "$i"
    mkdir -p "$state"
    write_config "$i"
    start_node "$i"
  done
  local start deadline
  start=$(date +%s)
  deadline=$((start + ready_timeout))
  while ! probe; do
    for i in $(nodes); do
      node "$i"
      # Whether the started process still lives, not its command line: right after the start
      # the child may not have executed java yet.
      if ! kill -0 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null; then
        tail -n 40 "$logfile" >&2
        die "node $i exited during start-up (log tail above)"
      fi
    done
    if [ "$(date +%s)" -ge "$deadline" ]; then
      tail -n 40 "$logfile" >&2
      die "the brokers did not answer a Kafka request within ${ready_timeout}s (log tail above)"
    fi
    sleep 1
  done
  if [ "$brokers" != 1 ]; then
    [ -f "$cluster_dir/scram.password" ] || { umask 077; openssl rand -hex 16 >"$cluster_dir/scram.password"; }
    node 1
    quiet_java "$here/kafka/Scram.java" "$(plain_bootstrap)" "$scram_user" "$cluster_dir/scram.password" \
      || die "could not create the SCRAM-SHA-512 user $scram_user"
    write_client_properties
  fi
  say "ready on $(plain_bootstrap) after $(($(date +%s) - start)) s"
}

# TERM to every node at once (a node stopped after the others lost the controller quorum
# would wait for it), then KILL what has not stopped within 30 s.
down() {
  local i pid pids=()
  for i in $(nodes); do
    node "$i"
    if pid="$(running_pid "$i")"; then
      say "stopping node $i (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$i:$pid")
    else
      say "node $i not running"
      rm -f "$pidfile"
    fi
  done
  local deadline=$(($(date +%s) + 30)) entry
  for entry in "${pids[@]}"; do
    i="${entry%%:*}"
    pid="${entry#*:}"
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      say "node $i did not stop within 30 s: sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    node "$i"
    rm -f "$pidfile"
  done
}

status() {
  local i pid missing=0
  for i in $(nodes); do
    node "$i"
    if pid="$(running_pid "$i")"; then
      echo "kafka: node $i running (pid $pid) on 127.0.0.1:$port"
    else
      echo "kafka: node $i not running (start it with deploy/local/kafka.sh up$([ "$brokers" = 1 ] || echo " --brokers $brokers"))"
      missing=1
    fi
  done
  [ "$missing" = 0 ] || return 3
  if probe; then
    echo "kafka: answering on $(plain_bootstrap)"
  else
    echo "kafka: does not answer on $(plain_bootstrap)"
    return 1
  fi
}

logs() {
  local i
  for i in $(nodes); do
    node "$i"
    [ "$brokers" = 1 ] || echo "== node $i: $logfile"
    tail -n "${1:-100}" "$logfile"
  done
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --brokers)
      [ "${2:-}" = 1 ] || [ "${2:-}" = 3 ] || die "--brokers takes 1 or 3 (got: ${2:-nothing})"
      brokers="$2"; shift 2 ;;
    --fresh) [ "$cmd" = up ] || die "--fresh goes with up"; args+=("$1"); shift ;;
    *) [ "$cmd" = logs ] || die "unknown argument: $1"; args+=("$1"); shift ;;
  esac
done

case "$cmd" in
  up) up "${args[@]}" ;;
  down) down ;;
  status) status ;;
  logs) logs "${args[@]}" ;;
  *) echo "usage: $0 up [--fresh]|down|status|logs [lines] [--brokers 3]" >&2; exit 2 ;;
esac
