#!/usr/bin/env bash
# Runs ChromeDriver with Debian's headless Chromium for the console's browser tests.
#
#   deploy/local/browser.sh up       install chromium + chromium-driver if absent, start chromedriver
#   deploy/local/browser.sh down     stop the chromedriver this script started
#   deploy/local/browser.sh status   say whether it answers
#
# Environment:
#   CHROMEDRIVER_PORT  port (default 9515; the tests read PRODUCT_SYNC_TEST_WEBDRIVER_URL,
#                      default http://127.0.0.1:9515)
set -euo pipefail

port="${CHROMEDRIVER_PORT:-9515}"
state_dir="${BROWSER_STATE_DIR:-/var/lib/product-sync/chromedriver-$port}"
pidfile="$state_dir/pid"
log="$state_dir/chromedriver.log"

say() { echo "browser.sh: $*" >&2; }
die() { say "$*"; exit 1; }

answers() { curl -fsS "http://127.0.0.1:$port/status" 2>/dev/null | grep -q '"ready": *true'; }

install() {
  # A CJK font too: product names are Chinese, and screenshots should show them.
  if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] \
    && [ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]; then return; fi
  command -v apt-get >/dev/null 2>&1 || die "Chromium is missing and apt-get is not available"
  [ "$(id -u)" = 0 ] || die "Chromium is missing: run as root (or sudo apt-get install chromium chromium-driver)"
  say "installing Debian packages chromium, chromium-driver and fonts-wqy-microhei"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-wqy-microhei >&2
}

up() {
  install
  if answers; then say "already running on 127.0.0.1:$port"; return; fi
  mkdir -p "$state_dir"
  nohup /usr/bin/chromedriver --port="$port" --allowed-ips=127.0.0.1 >"$log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 100); do
    if answers; then say "chromedriver ready on 127.0.0.1:$port ($(/usr/bin/chromium --version 2>/dev/null))"; return; fi
    sleep 0.1
  done
  die "chromedriver did not answer on 127.0.0.1:$port; see $log"
}

down() {
  if [ -f "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
    say "stopped"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) if answers; then say "running on 127.0.0.1:$port"; else say "not running"; exit 1; fi ;;
  *) die "usage: $0 up|down|status" ;;
esac
