#!/usr/bin/env bash
# Runs a real PostgreSQL server from Debian's packages for local development and the tests:
# its own cluster (initdb) listening on 127.0.0.1, with the role and database the tests use.
#
#   deploy/local/postgres.sh up       install if absent, init the cluster once, start, create role+db,
#                                     turn TLS on (the certificate of deploy/local/tls.sh)
#   deploy/local/postgres.sh down     stop the cluster this script started
#   deploy/local/postgres.sh status   say whether it runs and answers
#   deploy/local/postgres.sh url      print the connection URL of the test database
#
# Environment:
#   PG_PORT      port (default 5432)
#   PG_DATA_DIR  cluster directory (default /var/lib/product-sync/postgres-$PG_PORT)
#   PG_USER, PG_PASSWORD, PG_DATABASE  role and database for the tests (default product_sync)
set -euo pipefail

port="${PG_PORT:-5432}"
datadir="${PG_DATA_DIR:-/var/lib/product-sync/postgres-$port}"
user="${PG_USER:-product_sync}"
password="${PG_PASSWORD:-product_sync}"
database="${PG_DATABASE:-product_sync}"
ready_timeout="${PG_READY_TIMEOUT_S:-60}"
os_user=postgres

say() { echo "postgres.sh: $*" >&2; }
die() { say "$*"; exit 1; }

pg_bindir() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
  [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}

install_postgres() {
  command -v apt-get >/dev/null 2>&1 \
    || die "PostgreSQL is missing and apt-get is not available: install PostgreSQL 14+ by hand"
  [ "$(id -u)" = 0 ] || die "PostgreSQL is missing: run as root (or sudo apt-get install postgresql) and try again"
  say "PostgreSQL is missing: installing Debian package postgresql"
  # Do not let the package start its own cluster on our port; we run our own below.
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
  stop_debian_default_cluster
}

# The Debian package may create and start a `main` cluster on 5432. Stop it and make it manual,
# so only the cluster this script owns binds the port.
stop_debian_default_cluster() {
  command -v pg_lsclusters >/dev/null 2>&1 || return 0
  pg_lsclusters --no-header 2>/dev/null | while read -r ver name cport status _; do
    if [ "$cport" = "$port" ] && [ "$status" = "online" ]; then
      say "stopping Debian's default cluster $ver/$name on port $port (it would take our port)"
      pg_ctlcluster "$ver" "$name" stop || true
      echo manual >"/etc/postgresql/$ver/$name/start.conf" || true
    fi
  done
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$os_user" -- "$@"
  else
    "$@"
  fi
}

running() {
  [ -f "$datadir/postmaster.pid" ] || return 1
  as_pg "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1
}

answers() { "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port"; }

psql_admin() {
  as_pg "$bindir/psql" -v ON_ERROR_STOP=1 -q -X -h "$datadir" -p "$port" -d postgres "$@"
}

up() {
  bindir="$(pg_bindir)" || true
  if [ -z "${bindir:-}" ]; then
    install_postgres
    bindir="$(pg_bindir)" || die "PostgreSQL was installed but no initdb was found under /usr/lib/postgresql"
  fi
  if ! running; then
    if answers; then
      stop_debian_default_cluster
      answers && die "port $port is taken by a PostgreSQL this script did not start; stop it or set PG_PORT"
    fi
    if [ ! -f "$datadir/PG_VERSION" ]; then
      say "initialising a cluster in $datadir"
      mkdir -p "$datadir"
      chown "$os_user:" "$datadir" "$(dirname "$datadir")" 2>/dev/null || true
      chmod 700 "$datadir"
      as_pg "$bindir/initdb" -D "$datadir" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null \
        || as_pg "$bindir/initdb" -D "$datadir" -U postgres -A trust -E UTF8 --locale=C >/dev/null
      cat >>"$datadir/postgresql.conf" <<EOF
# product-sync local settings
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$datadir'
max_connections = 300
EOF
      # Password login over TCP for the tests' role; trust only on the cluster's own socket.
      cat >"$datadir/pg_hba.conf" <<EOF
local all postgres trust
local all all trust
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
EOF
    fi
    say "starting PostgreSQL ($("$bindir/postgres" --version | awk '{print $3}')) on 127.0.0.1:$port"
    as_pg "$bindir/pg_ctl" -D "$datadir" -l "$datadir/server.log" -w -t "$ready_timeout" start >/dev/null \
      || { tail -n 30 "$datadir/server.log" >&2; die "PostgreSQL did not start (log tail above)"; }
  fi
  local deadline=$(($(date +%s) + ready_timeout))
  until answers; do
    [ "$(date +%s)" -lt "$deadline" ] || die "PostgreSQL did not answer on 127.0.0.1:$port within ${ready_timeout}s"
    sleep 0.5
  done
  psql_admin <<EOF
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$user') THEN
    CREATE ROLE $user LOGIN CREATEDB PASSWORD '$password';
  END IF;
END \$\$;
EOF
  psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$database'" | grep -q 1 \
    || psql_admin -c "CREATE DATABASE $database OWNER $user"
  enable_tls
  say "ready: $(url)"
}

# ssl = on with the local test CA's server certificate (copied into the cluster, readable only
# by its owner, as the server demands). Plain connections stay allowed: pg_hba's `host` lines
# match both; a client asks for TLS with sslmode=verify-full&sslrootcert=<tls dir>/ca.pem.
enable_tls() {
  local here tls
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  "$here/tls.sh" up
  tls="$("$here/tls.sh" dir)"
  install -m 600 -o "$(stat -c %U "$datadir")" "$tls/server.pem" "$datadir/server.crt"
  install -m 600 -o "$(stat -c %U "$datadir")" "$tls/server.key" "$datadir/server.key"
  psql_admin >/dev/null <<EOF
ALTER SYSTEM SET ssl_cert_file = 'server.crt';
ALTER SYSTEM SET ssl_key_file = 'server.key';
ALTER SYSTEM SET ssl = on;
SELECT pg_reload_conf();
EOF
  # The reload is asynchronous: wait until a new session sees it.
  local deadline=$(($(date +%s) + ready_timeout))
  until [ "$(psql_admin -tAc 'SHOW ssl')" = on ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "PostgreSQL did not turn ssl on (see $datadir/server.log)"
    sleep 0.2
  done
}

down() {
  bindir="$(pg_bindir)" || { say "not installed"; return 0; }
  if running; then
    as_pg "$bindir/pg_ctl" -D "$datadir" -m fast -w -t 30 stop >/dev/null
    say "stopped"
  else
    say "not running"
  fi
}

status() {
  bindir="$(pg_bindir)" || { echo "postgres: not installed (deploy/local/postgres.sh up installs it)"; return 3; }
  if running && answers; then
    echo "postgres: running and answering on 127.0.0.1:$port ($(url))"
  else
    echo "postgres: not running (start it with deploy/local/postgres.sh up)"
    return 3
  fi
}

url() { echo "postgres://$user:$password@127.0.0.1:$port/$database"; }

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  url) url ;;
  *) echo "usage: $0 up|down|status|url" >&2; exit 2 ;;
esac
