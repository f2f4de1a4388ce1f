#!/usr/bin/env bash
# On the GPU machine, in a folder staged by bench/prepare_ab.sh: the base and the new trainer
# tree each run the single-GPU throughput command on the same shape (micro 8, fused loss, the
# breakdown and kernel table included), then, while NUMERICS_BY seconds (default 175) have not
# passed, each runs NUMERICS_STEPS (default 60) steps at micro 1 x 2 for the loss-curve check.
# Results files, the runs' raw results and a log archive go to $OUT (8 files at most).
# TINY=1: the same on CPU with a tiny model (a smoke test of the harness).
set -uo pipefail
here=$(pwd)
t0=$SECONDS
OUT=${OUT:?set OUT to the folder that comes back}
if [ -z "${TINY:-}" ] && [ ! -f /tmp/site/.cpt-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site whl/*.whl || exit 1
  touch /tmp/site/.cpt-wheels
fi
if [ -n "${TINY:-}" ]; then
  flags="--tiny --seq 128 --steps 12" logs=bench/work/gpu-tiny/logs
else
  flags="--steps 20" logs=bench/work/gpu/logs
fi
scratch=$(mktemp -d)
ab() { # tree tag prefix stem variant [more gpu_matrix flags]
  local tree=$1 tag=$2 prefix=$3 stem=$4 variant=$5
  shift 5
  (cd "$tree" && OUT=$scratch/$tag TAG=$tag bash bench/device.sh throughput h100 --no-hf \
    --timeout 150 --prefix "$prefix" --stem "$stem" --variant "$variant" $flags "$@")
  echo "== $tag done at $((SECONDS - t0))s"
}
ab base base optbase train-optim-base-h100 base-m8:micro=8,accum=1,fusedLoss=true
ab new new optim train-optim-h100 new-m8:micro=8,accum=1,fusedLoss=true
cp "$scratch"/base/train-optim-base-h100*.json "$scratch"/new/train-optim-h100*.json "$OUT/"
cp "base/$logs/native-base-m8.result.json" "new/$logs/native-new-m8.result.json" "$OUT/"
if [ $((SECONDS - t0)) -lt "${NUMERICS_BY:-175}" ]; then
  n=${NUMERICS_STEPS:-60}
  ab base numbase optnumbase num-base numbase:micro=1,accum=2,fusedLoss=true --steps "$n"
  ab new numnew optnumnew num-new numnew:micro=1,accum=2,fusedLoss=true --steps "$n"
  cp "base/$logs/native-numbase.result.json" "new/$logs/native-numnew.result.json" "$OUT/"
else
  echo "numerics runs skipped at $((SECONDS - t0))s"
fi
tar czf "$OUT/logs.tgz" -C "$scratch" . -C "$here/base/$logs" . -C "$here/new/$logs" . 2>/dev/null
echo "total $((SECONDS - t0))s"
