#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, training-operator, helm) from the pinned wrapper
# modules beside this script, through the Go module proxy.
#
# Binaries are cached under a stable directory keyed by the hash of every go.mod/go.sum
# and of this script, so a second run (or CI on the same machine) is a no-op.
# Prints the bin directory on the last line of stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false"

key=$(cat "$here"/*/go.mod "$here"/*/go.sum "$here/build.sh" | sha256sum | cut -c1-16)
cache=${CPT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cpt}
bin="$cache/devcluster-$key/bin"
mkdir -p "$bin"

KV=v1.34.4
KMAJ=1
KMIN=34
ldf="-s -w"
for kv in gitVersion=$KV gitMajor=$KMAJ gitMinor=$KMIN gitTreeState=clean \
  gitCommit=0000000000000000000000000000000000000000 buildDate=2026-01-01T00:00:00Z; do
  ldf="$ldf -X k8s.io/component-base/version.${kv%%=*}=${kv#*=} -X k8s.io/client-go/pkg/version.${kv%%=*}=${kv#*=}"
done

# build <module dir> <ldflags> <binary name>=<package> ...
build() {
  local dir=$1 flags=$2
  shift 2
  for spec in "$@"; do
    local name=${spec%%=*} pkg=${spec#*=}
    if [ -x "$bin/$name" ]; then continue; fi
    local t0=$SECONDS
    echo "building $name ..." >&2
    (cd "$here/$dir" && go build -tags selinux,notest,grpcnotrace -ldflags "$flags" -o "$bin/$name.tmp" "$pkg")
    mv "$bin/$name.tmp" "$bin/$name"
    echo "built $name in $((SECONDS - t0)) s" >&2
  done
}

build etcd "-s -w" etcd=go.etcd.io/etcd/server/v3
build kwok "-s -w" kwok=sigs.k8s.io/kwok/cmd/kwok
build helm "-s -w -X helm.sh/helm/v3/internal/version.version=v3.21.4" helm=helm.sh/helm/v3/cmd/helm
build trainer "-s -w" training-operator=github.com/kubeflow/training-operator/cmd/training-operator.v1
build k8s "$ldf" \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
  kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
  kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
  kubectl=k8s.io/kubernetes/cmd/kubectl

# The PyTorchJob CRD is taken from the training-operator module version we build.
crd="$bin/kubeflow.org_pytorchjobs.yaml"
if [ ! -f "$crd" ]; then
  dir=$(cd "$here/trainer" && go list -m -f '{{.Dir}}' github.com/kubeflow/training-operator)
  cp "$dir/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "$crd"
  chmod 0644 "$crd"
fi
# KWOK's stock stages ship inside its module; copy the ones we use.
stages="$bin/kwok-stages"
if [ ! -d "$stages" ]; then
  dir=$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
  mkdir -p "$stages.tmp"
  cp "$dir"/kustomize/stage/node/fast/node-initialize.yaml \
     "$dir"/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
     "$dir"/kustomize/stage/pod/fast/pod-ready.yaml \
     "$dir"/kustomize/stage/pod/fast/pod-delete.yaml "$stages.tmp/"
  chmod 0644 "$stages.tmp"/*
  mv "$stages.tmp" "$stages"
fi
echo "$bin"
