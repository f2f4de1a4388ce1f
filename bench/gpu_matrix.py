"""The single-GPU throughput suites: native variants against every HF Trainer configuration.

``python bench/gpu_matrix.py --suite throughput --kind h100`` (one H100, no checkpoint writes:
the stall benchmark is ``bench/gpu_train.py --suite ckpt``): prepares data and the random
Llama-3.2-1B-shaped model as ``bench/gpu_train.py`` does, runs each native variant
(``train_matrix.DEFAULT_VARIANTS`` or ``--variant``) as the real train stage with a step-time
breakdown and a kernel table, then each HF Trainer configuration
(``train_matrix.DEFAULT_HF_CONFIGS`` or ``--hf-config``), all in one command. The headline rows
are the fastest native variant's MFU (both FLOP counts) and its ratio to the fastest HF
configuration; every run, failed ones included, has a row with its full configuration.

``--suite levers``: the same variants without the HF rows, plus the numerics check: the trainer
as it was (FSDP on one device, plain head) and the new path (plain module, fused loss) for
``--numerics-steps`` steps on the same data, loss curves compared through 10-step means.

``--tiny`` runs everything on CPU with a tiny model (a smoke test of the harness).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, gpu_train
from bench import train_matrix as tm

T0 = time.monotonic()


def out_of_time(args: argparse.Namespace, name: str) -> str | None:
    """Past ``--deadline`` seconds since start, later runs are skipped (and say so), so the
    results file is still written inside the machine's time limit."""
    spent = time.monotonic() - T0
    if args.deadline and spent > args.deadline:
        print(f"[{name}] skipped: {spent:.0f}s spent of the {args.deadline:.0f}s deadline")
        return f"skipped: {spent:.0f}s spent of the {args.deadline:.0f}s deadline"
    return None


NUMERICS_REF = "numerics-ref:micro=1,accum=2,parallelism.fsdpSingleDevice=true,fusedLoss=false"
NUMERICS_NEW = "numerics-new:micro=1,accum=2,fusedLoss=true"

FULL_STAGE_DEFAULTS = {"fusedLoss": False, "parallelism": {"fsdpSingleDevice": False}}


def flop_counts(nat: dict[str, Any], shape: str, seq: int, layers: int = 0) -> dict[str, float]:
    """FLOPs per token, full attention (torchtitan's 6N + 12·L·H·Q·T, what the trainer reports)
    and causal only (the attention term halved)."""
    c = gpu_train.shape_config(shape, layers)
    heads = c["num_attention_heads"]
    q = c.get("head_dim") or c["hidden_size"] // heads
    attn_half = 6 * c["num_hidden_layers"] * heads * q * seq
    full = float(nat["flopsPerToken"])
    return {"full": full, "causal": full - attn_half}


def native_row(
    v: tm.Variant, nat: dict[str, Any], shape: str, seq: int, warmup: int, layers: int = 0
) -> dict[str, Any]:
    """Throughput, both MFUs, memory and the breakdown summary of one native run."""
    s = gpu_train.summarize_run(nat, warmup)
    flops = flop_counts(nat, shape, seq, layers)
    peak = nat.get("peakFlopsPerDevice")
    tps = s["tokensPerSecPerDevice"]
    bd = nat.get("breakdown") or {}
    return {
        "variant": v.name,
        "microBatch": v.micro,
        "gradAccum": v.accum,
        "stage": v.stage,
        **s,
        "mfuCausal": flops["causal"] * tps / peak if peak else None,
        "flopsPerTokenFull": flops["full"],
        "flopsPerTokenCausal": flops["causal"],
        "peakFlops": peak,
        "memory": nat.get("memory"),
        "breakdownStepMs": bd.get("stepMs"),
        "kernelTable": (bd.get("profile") or {}).get("kernelTable"),
    }


def run_native(
    args: argparse.Namespace,
    v: tm.Variant,
    model: Path,
    data: Path,
    work: Path,
    out_dir: Path,
    steps: int,
    breakdown: bool,
) -> dict[str, Any]:
    device = "cpu" if args.tiny else "cuda"
    cfg = gpu_train.train_config(
        model_dir=model,
        data_dir=data,
        ckpt_dir=work / f"ckpt-{v.name}",
        seq=args.seq,
        micro=v.micro,
        accum=v.accum,
        world=1,
        steps=steps,
        every=10**6,  # no checkpoint writes in a throughput run
        compile_model=not args.tiny,
        ac=args.ac,
        device=device,
    )
    cfg = tm.merge_stage(tm.merge_stage(cfg, FULL_STAGE_DEFAULTS), v.stage)
    extra = ["--legacy-saves", "0", "--breakdown-steps", "0"]
    if breakdown:
        extra = [
            "--legacy-saves",
            "0",
            "--breakdown-warmup",
            "2",
            "--breakdown-steps",
            "3",
            "--profile-steps",
            "0" if args.tiny else "2",
        ]
    try:
        return gpu_train.launch(
            f"native-{v.name}", cfg, 1, work, out_dir, extra, timeout=args.timeout
        )
    finally:
        shutil.rmtree(work / f"ckpt-{v.name}", ignore_errors=True)


def run_hf(args: argparse.Namespace, h: tm.HfConfig, model: Path, out_dir: Path) -> dict[str, Any]:
    """One HF Trainer configuration; a failure comes back as a row with its error."""
    res = out_dir / f"hf-{h.name}.result.json"
    res.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "bench.hf_trainer_baseline",
        "--model-dir",
        str(model),
        "--seq",
        str(args.seq),
        "--micro",
        str(h.micro),
        "--accum",
        str(h.accum),
        "--steps",
        str(args.hf_steps),
        "--warmup",
        str(args.warmup),
        "--attn",
        h.attn,
        "--result",
        str(res),
    ]
    for k, val in h.training_args.items():
        cmd += ["--targ", f"{k}={json.dumps(val)}"]
    row: dict[str, Any] = {
        "config": h.name,
        "microBatch": h.micro,
        "gradAccum": h.accum,
        "attn": h.attn,
        "trainingArgumentsSet": h.training_args,
    }
    skipped = out_of_time(args, f"hf-{h.name}")
    if skipped:
        return {**row, "failed": skipped}
    t0 = time.perf_counter()
    log = out_dir / f"hf-{h.name}.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.run(
                cmd,
                cwd=common.REPO,
                env=gpu_train._env(),
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=args.timeout,
                check=False,
            )
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    row["wallSeconds"] = time.perf_counter() - t0
    print(f"[hf-{h.name}] rc={rc} in {row['wallSeconds']:.0f}s", flush=True)
    if rc == 0 and res.is_file():
        row.update(json.loads(res.read_text()))
        row.pop("stepSeconds", None)
    else:
        row["failed"] = f"rc {rc}: " + log.read_text(errors="replace")[-1500:]
    return row


def setup(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    shape = "tiny" if args.tiny else args.shape
    carry = gpu_train.prepare_carry()
    t0 = time.perf_counter()
    data = gpu_train.make_data(work, args.seq, carry / "tok32k", carry / "corpus")
    model = gpu_train.make_model(work, shape, "cpu" if args.tiny else "cuda", args.layers)
    print(f"setup (data + model) {time.perf_counter() - t0:.0f}s", flush=True)
    return data, model, shape


def variant_runs(
    args: argparse.Namespace, data: Path, model: Path, shape: str, work: Path, out_dir: Path
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    default = tm.THROUGHPUT_VARIANTS if args.suite == "throughput" else tm.DEFAULT_VARIANTS
    specs = args.variant or list(default)
    rows, raw = [], {}
    for spec in specs:
        v = tm.parse_variant(spec, args.micro, args.accum)
        skipped = out_of_time(args, v.name)
        try:
            if skipped:
                raise RuntimeError(skipped)
            nat = run_native(args, v, model, data, work, out_dir, args.steps, breakdown=True)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            rows.append(
                {
                    "variant": v.name,
                    "stage": v.stage,
                    "microBatch": v.micro,
                    "gradAccum": v.accum,
                    "failed": str(exc)[-1500:],
                }
            )
            continue
        raw[v.name] = nat
        rows.append(native_row(v, nat, shape, args.seq, args.warmup, args.layers))
    return rows, raw


def numerics(
    args: argparse.Namespace, data: Path, model: Path, work: Path, out_dir: Path
) -> dict[str, Any]:
    """Two loss curves on the same data and seed, loss every step: by default the trainer as
    it was (FSDP on one device, plain head) against the new path (``--numerics-ref`` and
    ``--numerics-new`` name others, e.g. bf16 against float8)."""
    ref_v = tm.parse_variant(args.numerics_ref, 1, 2)
    new_v = tm.parse_variant(args.numerics_new, 1, 2)
    curves = {}
    for v in (ref_v, new_v):
        nat = run_native(args, v, model, data, work, out_dir, args.numerics_steps, False)
        curves[v.name] = [s["loss"] for s in sorted(nat["steps"], key=lambda s: s["step"])]
    out = tm.compare_curves(curves[ref_v.name], curves[new_v.name])
    out["ref"] = f"{ref_v.name}: micro {ref_v.micro} x accum {ref_v.accum}, stage {ref_v.stage}"
    out["new"] = f"{new_v.name}: micro {new_v.micro} x accum {new_v.accum}, stage {new_v.stage}"
    return out


def measurements(
    args: argparse.Namespace,
    machine: str,
    shape: str,
    rows: list[dict[str, Any]],
    raw: dict[str, dict[str, Any]],
    hf_rows: list[dict[str, Any]] | None,
    num: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    base_cfg = {
        "model": f"{shape} (random init)" + (f", {args.layers} layers" if args.layers else ""),
        "shape": gpu_train.shape_text(shape, args.layers),
        "seqLen": args.seq,
        "precision": "bf16",
        "activationCheckpointing": args.ac,
        "compile": not args.tiny,
        "card": machine,
    }
    items: list[dict[str, Any]] = []
    prefix = args.prefix or ("train" if args.suite == "throughput" else "levers")
    for r in rows:
        cfg = {
            **base_cfg,
            "variant": r["variant"],
            "microBatch": r["microBatch"],
            "gradAccum": r["gradAccum"],
            "stage": r["stage"],
        }
        items.append(
            common.measurement(
                f"{prefix}.native.variant.{r['variant']}",
                machine,
                cfg,
                "tokens/s",
                r.get("tokensPerSec") or 0.0,
                details=r,
            )
        )
    # MFU and the headline ratio are bf16's: float8 matmuls have another peak (torchtitan
    # reports no MFU for float8 either); float8's own ratio is a row of its own.
    best = tm.fastest(r for r in rows if not r["stage"].get("float8"))
    # A named shape run (--prefix) also gets its MFU row (with the planner's input): each one
    # is a calibration row of the planner's throughput model.
    if best is not None and (args.suite == "throughput" or args.prefix):
        nat = raw[best["variant"]]
        cfg = {
            **base_cfg,
            "variant": best["variant"],
            "microBatch": best["microBatch"],
            "gradAccum": best["gradAccum"],
            "stage": best["stage"],
            "params": nat["params"],
            "torch": nat["torch"],
        }
        items.append(
            common.measurement(
                f"{prefix}.native.mfu",
                machine,
                cfg,
                "MFU",
                best["mfu"] or 0.0,
                goal=common.goal(">=", 0.60) if prefix == "train" else None,
                details={
                    **best,
                    "convention": "full attention: 6N + 12·L·H·Q·T per token "
                    "(torchtitan), 989 TFLOP/s; mfuCausal halves the attention term",
                    # A model cut to fewer blocks probes the per-block cost; no one trains it,
                    # so it is no calibration row of the planner (no plannerInput).
                    **(
                        {}
                        if args.layers
                        else {
                            "plannerInput": gpu_train.planner_input(
                                nat["config"], nat, gpu_train.SHAPES[shape]["hidden_size"]
                            )
                        }
                    ),
                    "layers": gpu_train.shape_config(shape, args.layers)["num_hidden_layers"],
                },
            )
        )
        bd = nat["breakdown"]
        items.append(
            common.measurement(
                f"{prefix}.native.step_time",
                machine,
                cfg,
                "ms/step",
                bd["stepMs"],
                details={
                    k: bd[k]
                    for k in ("forwardBackwardMs", "optimizerMs", "otherMs", "warmupSeconds")
                    if k in bd
                }
                | {
                    "profile": bd.get("profile"),
                    "method": "CUDA events around each phase of "
                    "full steps (median of 3), torch.profiler over 2 more steps",
                },
            )
        )
        items.append(
            common.measurement(
                f"{prefix}.native.peak_memory",
                machine,
                cfg,
                "GiB",
                (nat.get("memory") or {}).get("peakAllocatedGiB", 0.0),
                details=nat.get("memory"),
            )
        )
        if hf_rows is not None:
            items += hf_measurements(machine, base_cfg, best, hf_rows)
            f8 = tm.fastest(r for r in rows if r["stage"].get("float8"))
            top = tm.fastest(hf_rows)
            if f8 is not None and top is not None:
                items.append(
                    common.measurement(
                        f"{prefix}.native.float8.vs_hf_trainer",
                        machine,
                        {**base_cfg, "variant": f8["variant"], "hfConfig": top["config"]},
                        "tokens/s",
                        f8["tokensPerSec"],
                        baseline=(
                            f"transformers Trainer, {top['config']} (bf16)",
                            top["tokensPerSec"],
                        ),
                        details={
                            "note": "float8 matmuls (torchao) against the fastest bf16 HF row"
                        },
                    )
                )
    if num is not None:
        items.append(
            common.measurement(
                f"{prefix}.native.numerics",
                machine,
                {**base_cfg, "microBatch": 1, "gradAccum": 2, "steps": num["steps"]},
                "max relative gap",
                num["maxRelativeGap"],
                goal=common.goal("<=", 0.01),
                details=num,
            )
        )
    return items


def hf_measurements(
    machine: str, base_cfg: dict[str, Any], best: dict[str, Any], hf_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    items = []
    for h in hf_rows:
        cfg = {
            **base_cfg,
            "hfConfig": h["config"],
            "microBatch": h["microBatch"],
            "gradAccum": h["gradAccum"],
            "attn": h["attn"],
            "trainingArguments": h.get("trainingArguments") or h["trainingArgumentsSet"],
        }
        items.append(
            common.measurement(
                f"train.hf.{h['config']}",
                machine,
                cfg,
                "tokens/s",
                h.get("tokensPerSec") or 0.0,
                details=h,
            )
        )
    top = tm.fastest(hf_rows)
    if top is not None:
        items.append(
            common.measurement(
                "train.native.vs_hf_trainer",
                machine,
                {**base_cfg, "variant": best["variant"], "hfConfig": top["config"]},
                "tokens/s",
                best["tokensPerSec"],
                baseline=(
                    f"transformers Trainer, fastest configuration: {top['config']} "
                    f"({json.dumps(top['trainingArgumentsSet'])}, micro {top['microBatch']}, "
                    f"{top['attn']})",
                    top["tokensPerSec"],
                ),
                goal=common.goal(">=", 1.5, "ratio"),
                details={
                    "native": best["variant"],
                    "hfRows": [
                        {
                            k: h.get(k)
                            for k in ("config", "tokensPerSec", "peakAllocatedGiB", "failed")
                        }
                        for h in hf_rows
                    ],
                },
            )
        )
        items.append(
            common.measurement(
                "train.hf_trainer.peak_memory",
                machine,
                {**base_cfg, "hfConfig": top["config"]},
                "GiB",
                top.get("peakAllocatedGiB") or 0.0,
                details={k: top.get(k) for k in ("peakAllocatedGiB", "peakReservedGiB")},
            )
        )
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["throughput", "levers"], default="throughput")
    p.add_argument("--kind", default="", help="device kind label for the results file name")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny model")
    p.add_argument("--out", help="also copy the results file here")
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--seq", type=int, default=0, help="default 4096 (128 with --tiny)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--hf-steps", type=int, default=12)
    p.add_argument("--numerics-steps", type=int, default=200)
    p.add_argument("--numerics-ref", default=NUMERICS_REF, help="reference variant spec")
    p.add_argument("--numerics-new", default=NUMERICS_NEW, help="compared variant spec")
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(gpu_train.SHAPES))
    p.add_argument("--layers", type=int, default=0, help="blocks instead of the shape's")
    p.add_argument("--prefix", default="", help="measurement names' prefix (train/levers)")
    p.add_argument("--stem", default="", help="results file name (default from the suite)")
    p.add_argument("--ac", default="none", choices=["none", "selective", "full"])
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--variant", action="append", help="NAME:key=value,... (repeatable)")
    p.add_argument("--hf-config", action="append", help="NAME:key=value,... (repeatable)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument(
        "--deadline", type=float, default=0, help="skip runs that would start after this many s"
    )
    p.add_argument("--results-dir", default=str(common.RESULTS))
    args = p.parse_args(argv)
    args.seq = args.seq or (128 if args.tiny else 4096)
    work = common.WORK / ("gpu-tiny" if args.tiny else "gpu")
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        machine = common.cpu_machine() + " (harness smoke test, not a benchmark)"
    else:
        import torch

        machine = f"{args.kind or 'gpu'}: 1x {torch.cuda.get_device_name(0)}"
    data, model, shape = setup(args, work)
    rows, raw = variant_runs(args, data, model, shape, work, out_dir)
    hf_rows = None
    if args.suite == "throughput" and not args.no_hf:
        specs = args.hf_config or list(tm.DEFAULT_HF_CONFIGS)
        hf_rows = [
            run_hf(args, tm.parse_hf_config(s, args.micro, args.accum), model, out_dir)
            for s in specs
        ]
    num = None
    if args.suite == "levers" and args.numerics_steps > 0:
        try:
            num = numerics(args, data, model, work, out_dir)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            print(f"numerics check failed: {str(exc)[-2000:]}", flush=True)
    items = measurements(args, machine, shape, rows, raw, hf_rows, num)
    stem = args.stem or ("train" if args.suite == "throughput" else "train-levers") + (
        f"-{args.kind}" if args.kind else ""
    )
    gpu_train.write_and_print(stem, items, args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
