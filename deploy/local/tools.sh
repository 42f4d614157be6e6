#!/usr/bin/env bash
# Tools the tests need that Debian does not package, built once per machine and cached like
# the Kafka jars: Prometheus's promtool (the alerting rules' unit tests), Helm (the chart's
# lint and rendering) and Toxiproxy's server (the network faults of the cluster chaos run)
# from their Go modules, mdBook (the book under docs/) from crates.io.
#
#   deploy/local/tools.sh up            build promtool and helm if not cached yet (Go only: may run
#                                       beside a cargo build)
#   deploy/local/tools.sh mdbook        build mdBook if not cached yet (cargo: not beside another)
#   deploy/local/tools.sh path NAME     print a tool's path (building it if needed)
#   deploy/local/tools.sh check         promtool: check and unit-test deploy/observability/alerts.yaml;
#                                       helm: lint deploy/helm/product-sync
#   deploy/local/tools.sh book          mdbook build docs (into docs/book, not committed)
#
# Environment:
#   PRODUCT_SYNC_CACHE   where the binaries live (default ~/.cache/product-sync)
#   PROMTOOL_VERSION     default v0.316.0 (github.com/prometheus/prometheus/cmd/promtool)
#   HELM_VERSION         default v3.22.0 (helm.sh/helm/v3/cmd/helm)
#   TOXIPROXY_VERSION    default v2.12.0 (github.com/Shopify/toxiproxy/v2/cmd/server)
#   MDBOOK_VERSION       default 0.5.4 (crates.io)
# A cold build takes minutes (promtool about 7 on 2 cores); it needs Go and the module proxy.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

cache="${PRODUCT_SYNC_CACHE:-$HOME/.cache/product-sync}"

say() { echo "tools.sh: $*" >&2; }
die() { say "$*"; exit 1; }

module_of() {
  case "$1" in
    promtool) echo "github.com/prometheus/prometheus/cmd/promtool@${PROMTOOL_VERSION:-v0.316.0}" ;;
    helm) echo "helm.sh/helm/v3/cmd/helm@${HELM_VERSION:-v3.22.0}" ;;
    toxiproxy) echo "github.com/Shopify/toxiproxy/v2/cmd/server@${TOXIPROXY_VERSION:-v2.12.0}" ;;
    mdbook) echo "mdbook@${MDBOOK_VERSION:-0.5.4}" ;;
    *) die "unknown tool: $1 (promtool, helm, toxiproxy, mdbook)" ;;
  esac
}

# The cached binary of a tool, built first if absent.
path_of() {
  local name="$1" module version dir
  module="$(module_of "$name")"
  version="${module##*@}"
  dir="$cache/$name-$version"
  if [ ! -x "$dir/$name" ]; then
    say "building $name $version from $module (once per machine)"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    if [ "$name" = mdbook ]; then
      # Its own target directory (a temporary one), not the project's.
      env -u CARGO_TARGET_DIR cargo install --quiet --locked --root "$dir.tmp" \
        mdbook --version "$version" >&2 || die "building $name failed (see above)"
      mv "$dir.tmp/bin/$name" "$dir.tmp/$name"
    else
      command -v go >/dev/null 2>&1 || die "Go is missing: $name is built from $module"
      GOBIN="$dir.tmp" CGO_ENABLED=0 go install "$module" >&2 || die "building $name failed (see above)"
      # A module whose command is not named after the tool (toxiproxy's is cmd/server).
      local built="${module%@*}"
      built="${built##*/}"
      [ "$built" = "$name" ] || mv "$dir.tmp/$built" "$dir.tmp/$name"
    fi
    mkdir -p "$dir" && mv "$dir.tmp/$name" "$dir/$name" && rm -rf "$dir.tmp"
  fi
  echo "$dir/$name"
}

check() {
  local promtool helm
  promtool="$(path_of promtool)"
  helm="$(path_of helm)"
  "$promtool" check rules deploy/observability/alerts.yaml
  "$promtool" test rules deploy/observability/alerts.test.yaml
  "$helm" lint --strict deploy/helm/product-sync
  "$helm" lint --strict deploy/helm/product-sync --set keda.enabled=true --set secret.create=true
}

# The book under docs/ (its links are checked by tests/integration/docs.rs).
book() {
  local mdbook
  mdbook="$(path_of mdbook)"
  "$mdbook" build docs
}

case "${1:-}" in
  up) path_of promtool >/dev/null; path_of helm >/dev/null; path_of toxiproxy >/dev/null ;;
  path) path_of "${2:?name}" ;;
  mdbook) path_of mdbook >/dev/null ;;
  check) check ;;
  book) book ;;
  *) die "usage: $0 up | mdbook | path NAME | check | book" ;;
esac
