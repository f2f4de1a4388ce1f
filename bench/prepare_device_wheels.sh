#!/usr/bin/env bash
# Download the exact wheel set a GPU machine needs beside its image (bench/device-wheels.txt:
# NAME==VERSION per line) for CPython 3.12 on manylinux x86-64, into DEST (default .whl/).
# Each wheel comes without its dependencies (--no-deps): the file names every one that the
# image lacks, so what travels is exactly the pinned list. Fails when a pin has no wheel.
# Usage: bench/prepare_device_wheels.sh [DEST]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-.whl}
list="$here/device-wheels.txt"
mapfile -t pins < <(grep -Ev '^\s*(#|$)' "$list")
rm -rf "$dest"
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dest" "${pins[@]}"
got=$(find "$dest" -type f -name '*.whl' | wc -l)
if [ "$got" -ne "${#pins[@]}" ]; then
  echo "expected ${#pins[@]} wheels from $list, got $got" >&2
  exit 1
fi
echo "$got wheels in $dest ($(du -sh "$dest" | cut -f1))"
