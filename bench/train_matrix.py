"""The configurations the single-GPU training suite runs, and the pure analysis of their runs.

* Native variants (``--variants``): named sets of train-stage settings (micro batch, fused loss,
  FSDP on one device...), each run as the real train stage; the suite's headline is the
  fastest.
* HF Trainer configurations (``--hf-configs``): named sets of ``TrainingArguments`` (plus micro
  batch and attention implementation) for ``bench/hf_trainer_baseline.py``; each one's result
  (or failure) is recorded with its full configuration, and the ratio is taken against the
  fastest that ran.
* The kernel table: GPU time per category from the profiler's kernel intervals, overlaps
  counted once and the GPU's idle time inside the window as a row of its own, so the rows add
  up to the profiled time per step.
* The numerics check: two loss curves on the same data, compared through 10-step means.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# -- named configurations --------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One native-trainer configuration: ``micro`` x ``accum`` and train-stage overrides."""

    name: str
    micro: int
    accum: int
    stage: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HfConfig:
    """One HF Trainer configuration: micro batch, attention and ``TrainingArguments``."""

    name: str
    micro: int
    accum: int
    attn: str = "sdpa"
    training_args: dict[str, Any] = field(default_factory=dict)


def _value(text: str) -> Any:
    """``true``/``4``/``"x"`` as JSON, anything else as the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(spec: str, what: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.partition(":")
    if not name:
        raise ValueError(f"{what} {spec!r}: expected NAME:key=value,key=value")
    out: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise ValueError(f"{what} {spec!r}: {item!r} is not key=value")
        out[key.strip()] = _value(val.strip())
    return name, out


def parse_variant(spec: str, micro: int, accum: int) -> Variant:
    """``NAME:micro=4,accum=2,fusedLoss=true,parallelism.fsdpSingleDevice=true`` (dotted keys
    go into nested train-stage sections; micro/accum default to the suite's)."""
    name, kv = _pairs(spec, "variant")
    m = int(kv.pop("micro", micro))
    a = int(kv.pop("accum", accum))
    stage: dict[str, Any] = {}
    for key, val in kv.items():
        node = stage
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = val
    return Variant(name, m, a, stage)


def parse_hf_config(spec: str, micro: int, accum: int) -> HfConfig:
    """``NAME:micro=4,accum=2,attn=sdpa,torch_compile=true,use_liger_kernel=true``: every
    key other than micro/accum/attn is a ``TrainingArguments`` field."""
    name, kv = _pairs(spec, "HF config")
    return HfConfig(
        name,
        int(kv.pop("micro", micro)),
        int(kv.pop("accum", accum)),
        str(kv.pop("attn", "sdpa")),
        kv,
    )


def merge_stage(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` applied (nested sections merged, not replaced)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_stage(out[k], v)
        else:
            out[k] = v
    return out


DEFAULT_VARIANTS = (
    # The trainer as it was: FSDP2 on one device, plain head.
    "fsdp-m2:micro=2,accum=4,parallelism.fsdpSingleDevice=true,fusedLoss=false",
    "plain-m2:micro=2,accum=4,fusedLoss=false",
    "plain-fused-m2:micro=2,accum=4,fusedLoss=true",
    "plain-fused-m4:micro=4,accum=2,fusedLoss=true",
    "plain-fused-m8:micro=8,accum=1,fusedLoss=true",
)

FLOAT8_VARIANT = "plain-fused-m8-float8:micro=8,accum=1,fusedLoss=true,float8=true"

THROUGHPUT_VARIANTS = (DEFAULT_VARIANTS[0], DEFAULT_VARIANTS[-1], FLOAT8_VARIANT)
"""The throughput suite's native rows: the trainer as it was, the fastest bf16 configuration
and the same with float8 matmuls (its own ratio row; MFU is bf16's)."""

DEFAULT_HF_CONFIGS = (
    # Most likely fastest first: under --deadline the tail is what gets skipped.
    "liger-m8:micro=8,accum=1,optim=adamw_torch_fused,use_liger_kernel=true",
    "liger-m4:micro=4,accum=2,optim=adamw_torch_fused,use_liger_kernel=true",
    "compile-m4:micro=4,accum=2,optim=adamw_torch_fused,torch_compile=true",
    "compile:optim=adamw_torch_fused,torch_compile=true",
    "sdpa:optim=adamw_torch_fused",
    "liger:optim=adamw_torch_fused,use_liger_kernel=true",
    "compile-liger:optim=adamw_torch_fused,torch_compile=true,use_liger_kernel=true",
)


def fastest(rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the highest ``tokensPerSec`` among those that ran."""
    ran = [r for r in rows if r.get("tokensPerSec")]
    return max(ran, key=lambda r: r["tokensPerSec"]) if ran else None


# -- the kernel table --------------------------------------------------------------------------

CATEGORY_ORDER = (
    "matmul",
    "attention",
    "fused elementwise/reduction (inductor/triton)",
    "optimizer",
    "communication (NCCL)",
    "memcpy/memset",
    "other kernels",
)
IDLE = "GPU idle (no kernel running)"


def exclusive_times(
    intervals: Sequence[tuple[float, float, str]],
) -> tuple[dict[str, float], float, float]:
    """Time per category from ``(start, end, category)`` kernel intervals: where kernels of
    several categories overlap (other streams), the time goes to the first category in
    ``CATEGORY_ORDER``, so nothing is counted twice. Returns (per category, idle time inside
    [first start, last end], that window's length); the categories plus idle equal the window.
    """
    if not intervals:
        return {}, 0.0, 0.0
    rank = {c: i for i, c in enumerate(CATEGORY_ORDER)}
    edges: list[tuple[float, int, str]] = []
    for s, e, c in intervals:
        if e > s:
            edges.append((s, 1, c))
            edges.append((e, -1, c))
    edges.sort(key=lambda x: (x[0], x[1]))
    active: dict[str, int] = {}
    out: dict[str, float] = {}
    idle = 0.0
    prev = edges[0][0]
    for t, delta, cat in edges:
        if t > prev:
            live = [c for c, n in active.items() if n > 0]
            if live:
                top = min(live, key=lambda c: rank.get(c, len(rank)))
                out[top] = out.get(top, 0.0) + (t - prev)
            else:
                idle += t - prev
            prev = t
        active[cat] = active.get(cat, 0) + delta
    window = edges[-1][0] - edges[0][0]
    return out, idle, window


def kernel_table(
    intervals: Sequence[tuple[float, float, str]], steps: int, step_ms: float | None
) -> dict[str, Any]:
    """Milliseconds per step by category (microsecond intervals in), idle included, and the
    CUDA-event step time beside it for comparison."""
    cats, idle, window = exclusive_times(intervals)
    rows = {k: v / 1000.0 / steps for k, v in cats.items()}
    rows[IDLE] = idle / 1000.0 / steps
    total = window / 1000.0 / steps
    return {
        "windowMsPerStep": total,
        "stepMsCudaEvents": step_ms,
        "rows": {
            k: {"msPerStep": v, "share": v / total if total else 0.0}
            for k, v in sorted(rows.items(), key=lambda kv: -kv[1])
        },
        "method": "kernel intervals from torch.profiler; overlapping kernels counted once "
        "(first of " + ", ".join(CATEGORY_ORDER) + "); idle = window minus busy time",
    }


# -- numerics ------------------------------------------------------------------------------------


def smoothed(losses: Sequence[float], window: int = 10) -> list[float]:
    """Means of consecutive, non-overlapping ``window``-step blocks."""
    return [
        sum(losses[i : i + window]) / window for i in range(0, len(losses) - window + 1, window)
    ]


def compare_curves(ref: Sequence[float], new: Sequence[float], window: int = 10) -> dict[str, Any]:
    """Largest relative gap between the two curves' block means, and the final blocks."""
    if len(ref) != len(new) or len(ref) < window:
        raise ValueError(f"curves of {len(ref)} and {len(new)} steps (need equal, >= {window})")
    a, b = smoothed(ref, window), smoothed(new, window)
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)]
    return {
        "steps": len(ref),
        "window": window,
        "maxRelativeGap": max(rel),
        "finalRef": a[-1],
        "finalNew": b[-1],
        "firstRef": a[0],
        "refBlocks": a,
        "newBlocks": b,
    }
