#!/usr/bin/env bash
# Runs a real single-node Apache Kafka broker (KRaft, no ZooKeeper, no Docker) from the
# official jars on Maven Central, for local development and the test suite.
#
#   deploy/local/kafka.sh up       fetch jars (cached), format storage, start, wait until ready
#   deploy/local/kafka.sh up --fresh   the same from empty storage (a running broker is stopped
#                                  first): every test world leaves its topics behind, and a
#                                  broker reused across many runs ran out of its heap
#   deploy/local/kafka.sh down     stop the broker this script started (TERM, then KILL)
#   deploy/local/kafka.sh status   say whether it runs and answers
#   deploy/local/kafka.sh logs     print the tail of the broker log
#
# Environment:
#   PRODUCT_SYNC_CACHE   where jars and broker state live (default ~/.cache/product-sync)
#   KAFKA_PORT           client port (default 9092; the controller uses KAFKA_PORT+1)
#   KAFKA_HEAP_OPTS      JVM heap (default -Xms512m -Xmx512m)
#   KAFKA_READY_TIMEOUT_S  how long `up` waits for a real Kafka request to succeed (default 120)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${PRODUCT_SYNC_CACHE:-$HOME/.cache/product-sync}"
port="${KAFKA_PORT:-9092}"
ctl_port=$((port + 1))
ready_timeout="${KAFKA_READY_TIMEOUT_S:-120}"
heap="${KAFKA_HEAP_OPTS:--Xms512m -Xmx512m}"

pom="$here/kafka/pom.xml"
kafka_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
jars="$cache/kafka-$kafka_version/libs"
state="$cache/kafka-run-$port"
data="$state/data"
pidfile="$state/kafka.pid"
logfile="$state/kafka.log"
props="$state/server.properties"
log4j="$state/log4j2.properties"

say() { echo "kafka.sh: $*" >&2; }
die() { say "$*"; exit 1; }

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

running_pid() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid="$(cat "$pidfile")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # Only our broker: the PID must still be a java process started with our properties file.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$props" || return 1
  echo "$pid"
}

write_config() {
  mkdir -p "$data"
  cat >"$props" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$ctl_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctl_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
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

# A real Kafka request (DescribeCluster through Kafka's Admin client), not a port check.
probe() {
  timeout 30 java -Xmx128m -cp "$(java_cp)" -Dlog4j2.configurationFile="$state/probe-log4j2.properties" \
    "$here/kafka/Probe.java" "127.0.0.1:$port" >/dev/null 2>&1
}

up() {
  ensure_tools
  fetch_jars
  if [ "${1:-}" = "--fresh" ]; then
    down
    say "fresh: removing the broker's storage and log ($state)"
    rm -rf "$data" "$logfile"
  elif [ -n "${1:-}" ]; then
    die "up takes only --fresh (got: $1)"
  fi
  mkdir -p "$state"
  write_config
  if pid="$(running_pid)"; then
    if probe; then
      say "already running (pid $pid) on 127.0.0.1:$port"
      return 0
    fi
    say "pid $pid exists but does not answer; waiting for it"
  else
    # A port held by another process (another broker, or one started with another
    # PRODUCT_SYNC_CACHE) would answer the readiness probe while ours fails to bind.
    for p in "$port" "$ctl_port"; do
      if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        die "127.0.0.1:$p is already taken by a process this script did not start (pid file: $pidfile); stop it, or choose another port with KAFKA_PORT"
      fi
    done
    [ -f "$state/cluster-id" ] || java -cp "$(java_cp)" -Dlog4j2.configurationFile="$log4j" \
      kafka.tools.StorageTool random-uuid >"$state/cluster-id" 2>/dev/null
    java -cp "$(java_cp)" -Dlog4j2.configurationFile="$log4j" kafka.tools.StorageTool format \
      -t "$(cat "$state/cluster-id")" -c "$props" --ignore-formatted >>"$logfile" 2>&1 \
      || { tail -n 30 "$logfile" >&2; die "formatting storage in $data failed (log above)"; }
    say "starting broker $kafka_version on 127.0.0.1:$port (heap: $heap, log: $logfile)"
    # shellcheck disable=SC2086
    nohup java $heap -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$log4j" -cp "$(java_cp)" kafka.Kafka "$props" \
      >>"$logfile" 2>&1 </dev/null &
    echo $! >"$pidfile"
  fi
  local start deadline
  start=$(date +%s)
  deadline=$((start + ready_timeout))
  while :; do
    if ! running_pid >/dev/null; then
      tail -n 40 "$logfile" >&2
      die "the broker process exited during start-up (log tail above)"
    fi
    if probe; then
      say "ready on 127.0.0.1:$port after $(($(date +%s) - start)) s (pid $(cat "$pidfile"))"
      return 0
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      tail -n 40 "$logfile" >&2
      die "the broker did not answer a Kafka request within ${ready_timeout}s (log tail above)"
    fi
    sleep 1
  done
}

down() {
  local pid
  if ! pid="$(running_pid)"; then
    say "not running"
    rm -f "$pidfile"
    return 0
  fi
  say "stopping broker pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; say "stopped"; return 0; }
    sleep 0.5
  done
  say "broker did not stop within 30 s: sending KILL"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

status() {
  local pid
  if pid="$(running_pid)"; then
    if probe; then
      echo "kafka: running (pid $pid) and answering on 127.0.0.1:$port"
    else
      echo "kafka: process $pid exists but does not answer on 127.0.0.1:$port"
      return 1
    fi
  else
    echo "kafka: not running (start it with deploy/local/kafka.sh up)"
    return 3
  fi
}

case "${1:-}" in
  up) up "${2:-}" ;;
  down) down ;;
  status) status ;;
  logs) tail -n "${2:-100}" "$logfile" ;;
  *) echo "usage: $0 up|down|status|logs [lines]" >&2; exit 2 ;;
esac
