#!/usr/bin/env bash
# Creates the project virtualenv once per machine under a stable cache directory keyed by
# the hash of requirements.lock (torch alone is several GB), links it to ./.venv, and
# (re)installs this checkout into it in editable mode, which is cheap.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cache=${CPT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cpt}
key=$(sha256sum requirements.lock | cut -c1-16)
venv="$cache/venv-py311-$key"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

if ! command -v uv >/dev/null 2>&1; then
  "$python" -m pip install --quiet --user "uv>=0.9" || "$python" -m pip install --quiet "uv>=0.9"
  export PATH="$HOME/.local/bin:$PATH"
fi
if [ ! -f "$venv/.complete" ]; then
  echo "creating $venv (first time on this machine: downloads torch, several GB)" >&2
  rm -rf "$venv"
  uv venv --quiet --python "$python" "$venv"
  UV_HTTP_TIMEOUT=300 uv pip sync --quiet --python "$venv/bin/python" requirements.lock
  touch "$venv/.complete"
fi
ln -sfn "$venv" .venv
uv pip install --quiet --python .venv/bin/python --no-deps -e . 
echo "$venv"
