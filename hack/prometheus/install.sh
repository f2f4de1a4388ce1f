#!/usr/bin/env bash
# The Prometheus server the e2e tests scrape the operator with (tests/e2e/test_prometheus.py):
# the `prometheus` binary of Debian's package, unpacked under the cpt cache (nothing is
# installed system-wide, no service is started). The cache directory is keyed by the package
# version apt offers and this script, so a second run is a no-op.
# Prints the path of the binary on the last line of stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${CPT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cpt}
candidate() { apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}'; }

if [ -n "${CPT_PROMETHEUS:-}" ]; then echo "$CPT_PROMETHEUS"; exit 0; fi
command -v apt-get >/dev/null || { echo "prometheus: no apt-get here; set CPT_PROMETHEUS" >&2; exit 1; }
version=$(candidate)
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
  apt-get update -qq >&2 || true
  version=$(candidate)
fi
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
  echo "prometheus: apt offers no 'prometheus' package; set CPT_PROMETHEUS" >&2
  exit 1
fi
key=$( (echo "$version"; cat "$here/install.sh") | sha256sum | cut -c1-16)
bin="$cache/prometheus-$key/bin"
if [ ! -x "$bin/prometheus" ]; then
  mkdir -p "$cache"
  exec 9>"$cache/prometheus.lock"
  flock 9
  if [ ! -x "$bin/prometheus" ]; then
    tmp=$(mktemp -d)
    chmod 755 "$tmp"  # apt downloads as its _apt user where it can
    trap 'rm -rf "$tmp"' EXIT
    echo "prometheus: fetching Debian's prometheus $version" >&2
    (cd "$tmp" && apt-get download -qq "prometheus=$version" >&2)
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
    mkdir -p "$bin"
    cp "$tmp/root/usr/bin/prometheus" "$bin/prometheus.tmp"
    mv "$bin/prometheus.tmp" "$bin/prometheus"
  fi
fi
echo "$bin/prometheus"
