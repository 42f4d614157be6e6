#!/usr/bin/env bash
# The local test CA and the servers' certificate, made with openssl on this machine (never
# committed): the three-broker cluster's SASL_SSL listeners (kafka.sh up --brokers 3) and
# PostgreSQL (postgres.sh up turns ssl on) present the server certificate; clients trust ca.pem.
#
#   deploy/local/tls.sh up       make the CA and the certificate unless they exist
#   deploy/local/tls.sh fresh    make new ones (servers pick them up at their next start)
#   deploy/local/tls.sh dir      print the directory (ca.pem, server.pem, server.key, server.p12)
#
# The server certificate names localhost and 127.0.0.1, valid 30 days; `up` makes a new one
# when it expires within a day. The PKCS#12 keystore's password is in keystore.password.
#
# Environment:
#   PRODUCT_SYNC_CACHE   where the directory lives (default ~/.cache/product-sync; dir: tls/)
set -euo pipefail

cache="${PRODUCT_SYNC_CACHE:-$HOME/.cache/product-sync}"
dir="$cache/tls"

say() { echo "tls.sh: $*" >&2; }
die() { say "$*"; exit 1; }

make_all() {
  command -v openssl >/dev/null 2>&1 || die "openssl is missing: apt-get install openssl"
  mkdir -p "$dir"
  chmod 755 "$dir"
  local tmp
  tmp="$(mktemp -d "$dir/.new.XXXXXX")"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=product-sync local test CA" \
    -keyout "$tmp/ca.key" -out "$tmp/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null || die "openssl could not make the CA"
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$tmp/server.key" -out "$tmp/server.csr" 2>/dev/null \
    || die "openssl could not make the server key"
  printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "extendedKeyUsage=serverAuth" \
    "basicConstraints=CA:FALSE" >"$tmp/server.ext"
  openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
    -CAcreateserial -days 30 -extfile "$tmp/server.ext" -out "$tmp/server.pem" 2>/dev/null \
    || die "openssl could not sign the server certificate"
  openssl rand -hex 16 >"$tmp/keystore.password"
  openssl pkcs12 -export -in "$tmp/server.pem" -inkey "$tmp/server.key" -name server \
    -passout "file:$tmp/keystore.password" -out "$tmp/server.p12" 2>/dev/null \
    || die "openssl could not write the PKCS#12 keystore"
  rm -f "$tmp/server.csr" "$tmp/server.ext" "$tmp/ca.srl"
  chmod 600 "$tmp/ca.key" "$tmp/server.key" "$tmp/keystore.password" "$tmp/server.p12"
  chmod 644 "$tmp/ca.pem" "$tmp/server.pem"
  for f in ca.key ca.pem server.key server.pem keystore.password server.p12; do
    mv -f "$tmp/$f" "$dir/$f"
  done
  rmdir "$tmp"
  say "made a test CA and a server certificate (localhost, 127.0.0.1) in $dir"
}

fresh_enough() {
  [ -f "$dir/ca.pem" ] && [ -f "$dir/server.pem" ] && [ -f "$dir/server.p12" ] \
    && openssl x509 -checkend 86400 -noout -in "$dir/server.pem" >/dev/null 2>&1
}

case "${1:-}" in
  up) fresh_enough || make_all ;;
  fresh) make_all ;;
  dir) echo "$dir" ;;
  *) echo "usage: $0 up|fresh|dir" >&2; exit 2 ;;
esac
