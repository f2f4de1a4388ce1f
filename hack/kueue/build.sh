#!/usr/bin/env bash
# Builds Kueue's controller manager (sigs.k8s.io/kueue, pinned by go.mod beside this script)
# through the Go module proxy, and copies its CRDs from the same module version.
#
# Cached under its own key (this directory's go.mod/go.sum and this script), apart from the
# control plane's binaries, so pinning another Kueue never rebuilds kube-apiserver.
# Prints the bin directory on the last line of stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false"

key=$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)
cache=${CPT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cpt}
bin="$cache/kueue-$key/bin"
mkdir -p "$bin"
exec 9>"$cache/kueue-build.lock"
flock 9

if [ ! -x "$bin/kueue" ]; then
  t0=$SECONDS
  echo "building kueue ..." >&2
  (cd "$here" && go build -ldflags "-s -w" -o "$bin/kueue.tmp" sigs.k8s.io/kueue/cmd/kueue)
  mv "$bin/kueue.tmp" "$bin/kueue"
  echo "built kueue in $((SECONDS - t0)) s" >&2
fi
crds="$bin/crds"
if [ ! -d "$crds" ]; then
  dir=$(cd "$here" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
  mkdir -p "$crds.tmp"
  cp "$dir"/config/components/crd/bases/*.yaml "$crds.tmp/"
  chmod 0644 "$crds.tmp"/*
  mv "$crds.tmp" "$crds"
fi
echo "$bin"
