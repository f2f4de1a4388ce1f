"""Run the benchmarks (``make bench``); results go to bench/results/*.json, then the tables of
docs/PERFORMANCE.md are regenerated from them (bench/report.py).

By default the CPU-side benchmarks run here: tokenization (goal 3), checkpoint transfer vs the
AWS CLI (goal 4), the planner's calibration error (goal 6) and, when the local control plane's
binaries are built, the operator at scale (goal 5). ``--only`` picks some of them.

The GPU benchmarks (goals 1, 2 and the checkpoint stall of goal 4) need a GPU machine.
``--gpu`` / ``--gpu-scaling`` run them on this machine (it must have the GPUs); on a lent GPU
machine the same scripts run through ``bench/device.sh`` (``--print-device-commands`` shows the
calls). Their results files are copied into bench/results/ like any other.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

CPU_BENCHES = ("tokenize", "ckpt_sync", "planner", "operator")

DEVICE_COMMANDS = """\
# Through the device tool, from the repo root, carrying .whl (bench/prepare_device_wheels.sh:
# the pinned set of bench/device-wheels.txt for Python 3.12) and bench/work/carry
# (python bench/run.py --prepare-carry). Results come back under $OUT with raw-SUITE.tgz (logs,
# raw per-run results); copy the JSON into bench/results/ (raw files: results/raw/).
# Goal 1, throughput: native variants + every HF Trainer configuration, one command (one H100):
# (variants and HF configurations: bench/train_matrix.py's defaults, or --variant/--hf-config)
bash bench/device.sh throughput h100 --steps 15 --hf-steps 12 --timeout 200 --deadline 500
# Goal 1, the levers one at a time + the 200-step loss-curve check (one H100):
bash bench/device.sh levers h100 --steps 15 --numerics-steps 200 --timeout 200 --deadline 400
# The attention and loss kernels alone (one H100; kernels-h100.json):
bash bench/device.sh kernels h100 --reps 10
# Float8 (torchao) on the 1B shape + its 200-step loss check against bf16 (one H100):
TAG=float8 bash bench/device.sh levers h100 --stem train-float8-h100 --prefix float8 --steps 12 \
  --variant "bf16-m8:micro=8,accum=1,fusedLoss=true" \
  --variant "float8-m8:micro=8,accum=1,fusedLoss=true,float8=true" \
  --numerics-ref "bf16:micro=1,accum=2,fusedLoss=true" \
  --numerics-new "float8:micro=1,accum=2,fusedLoss=true,float8=true" --numerics-steps 200
# The 3B shape, bf16 and float8, full activation checkpointing (one H100):
TAG=shape3b bash bench/device.sh levers h100 --shape llama-3.2-3b --stem train-3b-h100 \
  --prefix shape3b --steps 10 --numerics-steps 0 --ac full \
  --variant "bf16-m4-fullac:micro=4,accum=2,fusedLoss=true" \
  --variant "float8-m4-fullac:micro=4,accum=2,fusedLoss=true,float8=true"
# Issue 21 on one GPU: the Llama-3.1-8B shape cut to N blocks, seq 8192, FSDP2 on one device:
TAG=l8b bash bench/device.sh levers h100 --shape llama-3.1-8b --layers 4 --seq 8192 \
  --stem train-8b-4l-h100 --prefix shape8b4l --steps 8 --numerics-steps 0 --ac selective \
  --variant "fsdp-m1:micro=1,accum=1,fusedLoss=true,parallelism.fsdpSingleDevice=true"
# Goal 2 (two H200s; the one-GPU run also saves once with each staging):
bash bench/device.sh scaling h200x2 --ckpt-steps 185 --every 90 --steps 30 --timeout 330
# Goal 4, stall with the trainer's pinned staging (one H100):
bash bench/device.sh ckpt h100 --steps 205 --every 100 --legacy-saves 0 --timeout 480
# A trainer change against main, same command (one H100; ~3.5 min with the loss check): here
# `bench/prepare_ab.sh main BRANCH|PATCH .devwork/ab` (bench/pending/*.patch; a folder
# .git/info/exclude ignores, carried),
# there `cd .devwork/ab && bash run.sh`, here again `python bench/ab_trees.py --prefix optim
# --stem train-optim-h100 --base ...base-h100.json --new ...-h100.json --base-raw
# native-base-m8.result.json --new-raw native-new-m8.result.json [--base-num/--new-num]`.
# Goal 4, checkpoint transfer vs aws s3 cp on the idle 16-core host (CPU only, any kind; then
# again pinned to 2 of its cores). It carries bench/work/ckpt-carry, not .whl: first
# `python bench/ckpt_sync_bench.py --prepare-carry` here (clients' wheels + versitygw, ~40 MB).
# Results: ckpt_sync-device.json (rows ckpt.sync.16core.* and .16core-pin2.*; about 3 minutes):
bash bench/device.sh ckpt-sync 16core --pinned 2,3
"""


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(common.REPO / "bench" / f"{name}.py"), *args]


def operator_available() -> bool:
    """The operator benchmark needs the control plane's binaries (``make cluster-build``)."""
    common.bootstrap()
    try:
        sys.path.insert(0, str(common.REPO / "hack" / "devcluster"))
        import devcluster  # type: ignore[import-not-found]

        devcluster.find_bin_dir(build=False)
        return True
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=CPU_BENCHES, help="run only these")
    p.add_argument("--gpu", action="store_true", help="also run goal 1 on this machine's GPU")
    p.add_argument("--gpu-scaling", action="store_true", help="also run goal 2 (2+ GPUs)")
    p.add_argument("--kind", default="local", help="GPU machine label for the results")
    p.add_argument(
        "--quick", action="store_true", help="smaller inputs, results not written (harness check)"
    )
    p.add_argument("--print-device-commands", action="store_true")
    p.add_argument(
        "--prepare-carry",
        action="store_true",
        help="build bench/work/carry (corpus + tokenizer) for a GPU machine",
    )
    args = p.parse_args(argv)
    if args.print_device_commands:
        print(DEVICE_COMMANDS)
        return 0
    if args.prepare_carry:
        from bench import gpu_train

        print("carry ready:", gpu_train.prepare_carry())
        return 0
    chosen = args.only or list(CPU_BENCHES)
    quick = args.quick
    plan: list[tuple[str, list[str]]] = []
    if "tokenize" in chosen:
        plan.append(
            (
                "tokenize",
                _script(
                    "tokenize_bench",
                    *(
                        ["--repeat", "4", "--reps", "1", "--seed-reps", "1", "--no-write"]
                        if quick
                        else []
                    ),
                ),
            )
        )
    if "ckpt_sync" in chosen:
        plan.append(
            (
                "ckpt_sync",
                _script(
                    "ckpt_sync_bench",
                    *(
                        ["--files", "2", "--file-mib", "64", "--reps", "1", "--no-write"]
                        if quick
                        else []
                    ),
                ),
            )
        )
    if "operator" in chosen:
        if operator_available():
            plan.append(
                (
                    "operator",
                    _script(
                        "operator_bench",
                        *(["--crs", "20", "--idle-crs", "50", "--no-write"] if quick else []),
                    ),
                )
            )
        else:
            print("operator: skipped (control plane binaries not built: make cluster-build)")
    if args.gpu:
        plan.append(("gpu", _script("gpu_matrix", "--suite", "throughput", "--kind", args.kind)))
    if args.gpu_scaling:
        plan.append(
            ("gpu-scaling", _script("gpu_train", "--suite", "scaling", "--kind", args.kind))
        )
    # The planner reads the GPU results (held-out rows), so it runs last.
    if "planner" in chosen:
        plan.append(("planner", _script("planner_bench")))
    failed = []
    for name, cmd in plan:
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=common.REPO)
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f}s", flush=True)
        if rc != 0:
            failed.append(name)
    subprocess.call(_script("report"), cwd=common.REPO)
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
