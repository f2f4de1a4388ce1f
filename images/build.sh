#!/usr/bin/env bash
# Build (and with --push, push) the cpt container images from the repository root.
#
#   images/build.sh [--push] [--registry REG] [--tag TAG] [IMAGE...]
#
# IMAGE is one of: operator trainer-neuron trainer-torchneuron trainer-cuda trainer-cpu (default: all).
# Images are named $REGISTRY/cpt-<image>:<tag>; REGISTRY defaults to ghcr.io/cpt-dev (the
# chart's and the operator's defaults), TAG to the project version from pyproject.toml.
# trainer-cpu is also tagged cpt-tools (the operator's image for tokenize/export Jobs). The engine is $CONTAINER_ENGINE, else the
# first of docker, podman, nerdctl that answers `info`; without one this says so and exits 0.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

all=(operator trainer-neuron trainer-torchneuron trainer-cuda trainer-cpu)
registry=${REGISTRY:-ghcr.io/cpt-dev}
tag=${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}
push=0
images=()
while [ $# -gt 0 ]; do
  case "$1" in
    --push) push=1 ;;
    --registry) registry=$2; shift ;;
    --tag) tag=$2; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) images+=("$1") ;;
  esac
  shift
done
[ ${#images[@]} -gt 0 ] || images=("${all[@]}")
for img in "${images[@]}"; do
  if [ ! -f "images/$img/Dockerfile" ]; then
    echo "unknown image '$img'; known: ${all[*]}" >&2
    exit 2
  fi
done

# An engine counts only if it answers (a docker CLI without a daemon does not).
engine=""
found=()
for e in ${CONTAINER_ENGINE:-docker podman nerdctl}; do
  command -v "$e" >/dev/null 2>&1 || continue
  found+=("$e")
  if "$e" info >/dev/null 2>&1; then engine=$e; break; fi
done
if [ -z "$engine" ]; then
  if [ ${#found[@]} -gt 0 ]; then
    echo "container engine ${found[*]} installed but not reachable (no daemon?): not building ${images[*]}" >&2
  else
    echo "no container engine found (docker, podman or nerdctl): not building ${images[*]}" >&2
  fi
  exit 0
fi

for img in "${images[@]}"; do
  dockerfile="images/$img/Dockerfile"
  refs=("$registry/cpt-$img:$tag")
  [ "$img" = trainer-cpu ] && refs+=("$registry/cpt-tools:$tag")
  echo "building ${refs[*]}" >&2
  tags=()
  for r in "${refs[@]}"; do tags+=(-t "$r"); done
  "$engine" build -f "$dockerfile" "${tags[@]}" .
  if [ "$push" = 1 ]; then
    for r in "${refs[@]}"; do "$engine" push "$r"; done
  fi
done
