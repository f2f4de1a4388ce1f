#!/usr/bin/env bash
# Creates this checkout's own virtualenv in ./.venv and installs the checkout into it
# (editable). Each checkout has its own environment, so two clones in use at once never import
# each other's code; the heavy part (torch alone is several GB) is shared through uv's package
# cache, from which uv links files instead of downloading them again, so a second checkout's
# venv takes seconds.
#
# uv itself is pinned (UV_VERSION) and installed once per machine under the cpt cache, and
# called by its path: it does not need to be on PATH, so a plain non-login shell (where
# ~/.local/bin is often missing) behaves like any other. The venv records the lock hash it
# was synced from and is re-synced when requirements.lock changes.
#
# Prints the venv's path on the last line of stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
UV_VERSION=0.13.9
cache=${CPT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cpt}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

uv_dir="$cache/tools/uv-$UV_VERSION"
uv="$uv_dir/bin/uv"
if [ ! -x "$uv" ]; then
  echo "installing uv $UV_VERSION under $uv_dir" >&2
  rm -rf "$uv_dir.tmp"
  "$python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$uv_dir.tmp" "uv==$UV_VERSION"
  rm -rf "$uv_dir"
  mv "$uv_dir.tmp" "$uv_dir"
fi
# The bin dir of uv's --target install has no python wrapper issue: `uv` is a static binary.

key=$(sha256sum requirements.lock | cut -c1-16)
venv="$root/.venv"
# Older versions of this script linked .venv to one venv shared by every checkout.
if [ -L "$venv" ]; then rm -f "$venv"; fi
if [ "$(cat "$venv/.cpt-lock" 2>/dev/null)" != "$key" ]; then
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv (the first time on a machine downloads torch: several GB)" >&2
    rm -rf "$venv"
    "$uv" venv --quiet --python "$python" "$venv"
  fi
  UV_HTTP_TIMEOUT=300 "$uv" pip sync --quiet --python "$venv/bin/python" requirements.lock
  echo "$key" >"$venv/.cpt-lock"
fi
"$uv" pip install --quiet --python "$venv/bin/python" --no-deps -e .
# Tests and tools that need uv find it here (the venv's bin is first on the Makefile's PATH).
ln -sfn "$uv" "$venv/bin/uv"
echo "$venv"
