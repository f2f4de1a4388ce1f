#!/usr/bin/env bash
# The GPU benchmarks as run on a lent GPU machine (`bench/run.py --print-device-commands`).
# Usage (from the repo root, on the GPU machine): bench/device.sh SUITE KIND [args...]
#   throughput: native variants + every HF Trainer configuration, no checkpoint writes
#               (bench/gpu_matrix.py; results train-KIND.json)
#   levers:     native variants + the 200-step numerics check (train-levers-KIND.json)
#   ckpt:       checkpoint stalls only (bench/gpu_train.py --suite ckpt)
#   scaling:    one GPU against FSDP2 over two (bench/gpu_train.py --suite scaling)
#   ckpt-sync:  checkpoint transfer benchmark, CPU only (bench/device_ckpt_sync.sh)
#   kernels:    the attention and loss kernels alone (bench/kernel_bench.py; kernels-KIND.json)
# TAG=name names the log and the raw archive (run-TAG.log, raw-TAG.tgz; default the suite), so
# several runs of one suite in one call keep theirs.
# Needs the wheels of bench/device-wheels.txt in .whl/ (bench/prepare_device_wheels.sh) and
# bench/work/carry (python bench/run.py --prepare-carry). Logs and raw results go to
# $OUT/raw-SUITE.tgz beside the results file (the device returns a few files, not folders).
set -uo pipefail
suite=${1:?suite: throughput, levers, scaling, ckpt, ckpt-sync or kernels}
kind=${2:?kind label, e.g. h100}
shift 2
if [ "$suite" = ckpt-sync ]; then
  exec bash "$(dirname "$0")/device_ckpt_sync.sh" "$kind" "$@"
fi
out=${OUT:-bench/work/out}
mkdir -p "$out"
# Once per machine: later runs in the same call reuse the installed set.
if [ ! -f /tmp/site/.cpt-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  touch /tmp/site/.cpt-wheels
fi
# CPT_EXTRA_SITE: more packages (e.g. the checkpoint benchmark's unpacked clients).
export PYTHONPATH=/tmp/site${CPT_EXTRA_SITE:+:$CPT_EXTRA_SITE} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_LOGS=recompiles
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.limit --format=csv
python3 -c 'import torch, transformers, pyarrow, datasets, pydantic, tokenizers
print("torch", torch.__version__, "transformers", transformers.__version__, "pyarrow",
      pyarrow.__version__, "datasets", datasets.__version__, "tokenizers", tokenizers.__version__)'
tag=${TAG:-$suite}
if [ "$suite" = kernels ]; then
  python3 bench/kernel_bench.py --kind "$kind" --out "$out" "$@" 2>&1 | tee "$out/run-$tag.log"
  exit "${PIPESTATUS[0]}"
fi
case "$suite" in
  throughput | levers) script=bench/gpu_matrix.py ;;
  *) script=bench/gpu_train.py ;;
esac
python3 "$script" --suite "$suite" --kind "$kind" --out "$out" "$@" 2>&1 | tee "$out/run-$tag.log"
rc=${PIPESTATUS[0]}
tar czf "$out/raw-$tag.tgz" -C bench/work/gpu logs 2>/dev/null
exit "$rc"
