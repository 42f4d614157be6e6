#!/usr/bin/env bash
# Tools the tests need that Debian does not package, built once per machine from their Go
# modules and cached like the Kafka jars: Prometheus's promtool (the alerting rules' unit
# tests) and Helm (the chart's lint and rendering).
#
#   deploy/local/tools.sh up            build whatever is not cached yet
#   deploy/local/tools.sh path NAME     print a tool's path (building it if needed)
#   deploy/local/tools.sh check         promtool: check and unit-test deploy/observability/alerts.yaml;
#                                       helm: lint deploy/helm/product-sync
#
# Environment:
#   PRODUCT_SYNC_CACHE   where the binaries live (default ~/.cache/product-sync)
#   PROMTOOL_VERSION     default v0.316.0 (github.com/prometheus/prometheus/cmd/promtool)
#   HELM_VERSION         default v3.22.0 (helm.sh/helm/v3/cmd/helm)
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
    *) die "unknown tool: $1 (promtool, helm)" ;;
  esac
}

# The cached binary of a tool, built first if absent.
path_of() {
  local name="$1" module version dir
  module="$(module_of "$name")"
  version="${module##*@}"
  dir="$cache/$name-$version"
  if [ ! -x "$dir/$name" ]; then
    command -v go >/dev/null 2>&1 || die "Go is missing: $name is built from $module"
    say "building $name $version from $module (once per machine)"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    GOBIN="$dir.tmp" CGO_ENABLED=0 go install "$module" >&2 || die "building $name failed (see above)"
    mkdir -p "$dir" && mv "$dir.tmp/$name" "$dir/$name" && rmdir "$dir.tmp"
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

case "${1:-}" in
  up) path_of promtool >/dev/null; path_of helm >/dev/null ;;
  path) path_of "${2:?name}" ;;
  check) check ;;
  *) die "usage: $0 up | path NAME | check" ;;
esac
