#!/usr/bin/env bash
# The GPU benchmarks as run on a lent GPU machine (`bench/run.py --gpu` prints the call).
# Usage (from the repo root, on the GPU machine): bench/device.sh single|scaling|ckpt KIND [args...]
# Needs the carried wheels in .whl/ (pydantic, datasets and their pure-Python deps; the image
# has torch, transformers, pyarrow, tokenizers) and bench/work/carry (corpus + tokenizer).
# `bench/device.sh ckpt-sync LABEL [--pinned CPUS] [args...]` runs the checkpoint transfer
# benchmark (CPU only) instead: see bench/device_ckpt_sync.sh (it carries bench/work/ckpt-carry).
set -uo pipefail
suite=${1:?suite: single, scaling, ckpt or ckpt-sync}
kind=${2:?kind label, e.g. h100}
shift 2
if [ "$suite" = ckpt-sync ]; then
  exec bash "$(dirname "$0")/device_ckpt_sync.sh" "$kind" "$@"
fi
out=${OUT:-bench/work/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_LOGS=recompiles
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.limit --format=csv
df -h . | tail -1
python3 -c 'import torch, transformers, pyarrow, datasets, pydantic, tokenizers
print("torch", torch.__version__, "transformers", transformers.__version__, "pyarrow",
      pyarrow.__version__, "datasets", datasets.__version__, "tokenizers", tokenizers.__version__)'
python3 bench/gpu_train.py --suite "$suite" --kind "$kind" --out "$out" "$@" 2>&1 | tee "$out/run.log"
