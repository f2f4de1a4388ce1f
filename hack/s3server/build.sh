#!/usr/bin/env bash
# Builds a compiled S3 protocol server for loopback benchmarks and tests: versitygw (the Versity
# S3 Gateway, Apache-2.0) with its posix backend, from the module version pinned in go.mod/go.sum
# beside this script, through the Go module proxy. No source is vendored here.
#
# Why a second server next to moto: moto is one Python process that buffers every part in
# memory, so against it every client uploads at moto's pace; versitygw is a Go server that
# writes parts to files and stitches them with copy_file_range, so the client is what is measured.
#
# The binary is cached under a directory keyed by the hash of go.mod, go.sum and this script,
# so a second run is a no-op (one build takes about 1.5 minutes on 2 cores).
# Prints the path of the binary on the last line of stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false"

key=$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)
cache=${CPT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cpt}
bin="$cache/s3server-$key/bin"
mkdir -p "$bin"

if [ ! -x "$bin/versitygw" ]; then
  t0=$SECONDS
  echo "building versitygw ..." >&2
  (cd "$here" && go build -ldflags "-s -w" -o "$bin/versitygw.tmp" github.com/versity/versitygw/cmd/versitygw)
  mv "$bin/versitygw.tmp" "$bin/versitygw"
  echo "built versitygw in $((SECONDS - t0)) s" >&2
fi
echo "$bin/versitygw"
