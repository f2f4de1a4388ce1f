#!/usr/bin/env bash
# Builds the real node's kubelet (the control plane's Kubernetes version, v1.34.4) and the
# pod sandbox's pause binary from the pinned wrapper module in kubelet/, through the Go
# module proxy.
#
# Its own module and its own cache key (the hash of kubelet/'s go.mod, go.sum, pause source
# and this script), so adding or changing the node never invalidates the control plane's
# binaries that hack/devcluster/build.sh caches (a full rebuild of those costs about 20 min
# on 2 cores; the kubelet alone 4-8 min). Prints the bin directory on the last line of stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false"

key=$(cat "$here/kubelet/go.mod" "$here/kubelet/go.sum" "$here/kubelet/pause/main.go" "$here/build.sh" \
  | sha256sum | cut -c1-16)
cache=${CPT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cpt}
bin="$cache/node-$key/bin"
mkdir -p "$bin"
exec 9>"$cache/node-$key.lock"
flock 9

KV=v1.34.4
ldf="-s -w"
for kv in gitVersion=$KV gitMajor=1 gitMinor=34 gitTreeState=clean \
  gitCommit=0000000000000000000000000000000000000000 buildDate=2026-01-01T00:00:00Z; do
  ldf="$ldf -X k8s.io/component-base/version.${kv%%=*}=${kv#*=} -X k8s.io/client-go/pkg/version.${kv%%=*}=${kv#*=}"
done

# build <binary name> <ldflags> <package>
build() {
  local name=$1 flags=$2 pkg=$3
  if [ -x "$bin/$name" ]; then return; fi
  local t0=$SECONDS
  echo "building $name ..." >&2
  (cd "$here/kubelet" && go build -tags selinux,notest,grpcnotrace -ldflags "$flags" -o "$bin/$name.tmp" "$pkg")
  mv "$bin/$name.tmp" "$bin/$name"
  echo "built $name in $((SECONDS - t0)) s" >&2
}

build pause "-s -w" ./pause
build kubelet "$ldf" k8s.io/kubernetes/cmd/kubelet
echo "$bin"
