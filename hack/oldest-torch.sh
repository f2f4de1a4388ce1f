#!/usr/bin/env bash
# A second virtualenv with the oldest supported torch (hack/oldest-torch.txt) over the locked
# stack, for the CPU test that runs the native trainer on it (tests/integration/
# test_train_native_oldest_torch.py). It lives in the cpt cache, keyed by the hash of both
# files, so every checkout shares it and a lock change builds a new one; packages are linked
# from uv's cache. cpt itself is not installed there: the test puts the checkout's package
# roots on PYTHONPATH, so each checkout tests its own code.
#
# Cost: the main lock is already in uv's cache (make install), so a cold build downloads only
# torch 2.13's wheel (see docs/training.md for the measured numbers).
#
# Prints the environment's python on the last line of stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cache=${CPT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cpt}
uv="$cache/tools/uv-0.13.9/bin/uv"
[ -x "$uv" ] || "$root/hack/install.sh" >/dev/null
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
key=$(cat requirements.lock hack/oldest-torch.txt | sha256sum | cut -c1-16)
venv="$cache/venv-oldest-torch-$key"
if [ ! -f "$venv/.cpt-ready" ]; then
  exec 9>"$venv.lock"
  flock 9
  if [ ! -f "$venv/.cpt-ready" ]; then
    echo "building $venv (oldest supported torch)" >&2
    rm -rf "$venv"
    "$uv" venv --quiet --python "$python" "$venv"
    UV_HTTP_TIMEOUT=300 "$uv" pip sync --quiet --python "$venv/bin/python" requirements.lock
    UV_HTTP_TIMEOUT=300 "$uv" pip install --quiet --python "$venv/bin/python" --no-deps \
      -r hack/oldest-torch.txt
    touch "$venv/.cpt-ready"
  fi
fi
echo "$venv/bin/python"
