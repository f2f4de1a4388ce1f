"""The single-GPU suite's configurations and pure analysis (bench/train_matrix.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import train_matrix as tm

pytestmark = pytest.mark.unit


def test_a_variant_spec_sets_batch_and_nested_stage_fields() -> None:
    v = tm.parse_variant("x:micro=4,accum=2,fusedLoss=true,parallelism.fsdpSingleDevice=true", 2, 4)
    assert (v.name, v.micro, v.accum) == ("x", 4, 2)
    assert v.stage == {"fusedLoss": True, "parallelism": {"fsdpSingleDevice": True}}
    d = tm.parse_variant("plain", 2, 4)
    assert (d.micro, d.accum, d.stage) == (2, 4, {})


def test_an_hf_spec_passes_every_other_key_as_a_training_argument() -> None:
    h = tm.parse_hf_config("c:micro=4,attn=eager,torch_compile=true,optim=adamw_torch_fused", 2, 4)
    assert (h.name, h.micro, h.accum, h.attn) == ("c", 4, 4, "eager")
    assert h.training_args == {"torch_compile": True, "optim": "adamw_torch_fused"}


@pytest.mark.parametrize("spec", [":a=1", "x:novalue", "x:=3"])
def test_malformed_specs_are_rejected_naming_the_spec(spec: str) -> None:
    with pytest.raises(ValueError, match=r"expected NAME|is not key=value"):
        tm.parse_variant(spec, 1, 1)


def test_every_default_configuration_parses() -> None:
    assert len({tm.parse_variant(s, 2, 4).name for s in tm.DEFAULT_VARIANTS}) == len(
        tm.DEFAULT_VARIANTS
    )
    names = {tm.parse_hf_config(s, 2, 4).name for s in tm.DEFAULT_HF_CONFIGS}
    assert {"compile", "liger", "sdpa"} <= names


def test_merge_keeps_nested_sections() -> None:
    base = {"a": 1, "parallelism": {"tensorParallel": 1, "fsdpSingleDevice": False}}
    out = tm.merge_stage(base, {"parallelism": {"fsdpSingleDevice": True}, "b": 2})
    assert out == {"a": 1, "b": 2, "parallelism": {"tensorParallel": 1, "fsdpSingleDevice": True}}
    assert base["parallelism"]["fsdpSingleDevice"] is False


def test_fastest_ignores_failed_rows() -> None:
    rows = [{"n": 1, "tokensPerSec": 5.0}, {"n": 2, "failed": "oom"}, {"n": 3, "tokensPerSec": 7}]
    assert tm.fastest(rows) == rows[2]
    assert tm.fastest([{"failed": "x"}]) is None


def test_overlapping_kernels_are_counted_once_and_idle_time_fills_the_window() -> None:
    intervals = [
        (0.0, 10.0, "matmul"),
        (5.0, 12.0, "memcpy/memset"),  # overlaps the matmul for 5: only 2 of its own
        (15.0, 20.0, "attention"),  # 3 idle before it
        (16.0, 18.0, "matmul"),  # inside attention: the matmul ranks first
    ]
    cats, idle, window = tm.exclusive_times(intervals)
    assert window == 20.0
    assert cats == {"matmul": 12.0, "memcpy/memset": 2.0, "attention": 3.0}
    assert idle == 3.0
    assert sum(cats.values()) + idle == pytest.approx(window)


def test_the_kernel_table_adds_up_to_the_window_per_step() -> None:
    t = tm.kernel_table([(0, 4000, "matmul"), (5000, 6000, "other kernels")], 2, 3.1)
    rows = t["rows"]
    assert t["windowMsPerStep"] == 3.0
    assert sum(r["msPerStep"] for r in rows.values()) == pytest.approx(3.0)
    assert rows[tm.IDLE]["msPerStep"] == 0.5
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
    assert tm.exclusive_times([]) == ({}, 0.0, 0.0)


def test_curves_are_compared_through_block_means() -> None:
    ref = [10.0 - 0.01 * i for i in range(40)]
    new = [x * 1.002 for x in ref]
    out = tm.compare_curves(ref, new, window=10)
    assert len(out["refBlocks"]) == 4
    assert out["maxRelativeGap"] == pytest.approx(0.002)
    with pytest.raises(ValueError, match="equal"):
        tm.compare_curves(ref, new[:-1])


def test_the_suite_s_rows_from_a_real_h100_run_carry_both_mfu_counts_and_the_fair_ratio() -> None:
    import argparse
    import json

    from bench import common, gpu_matrix

    raw = Path(__file__).resolve().parents[2] / "bench/results/raw/h100-throughput"
    nat = json.loads((raw / "native-plain-fused-m8.result.json").read_text())
    hf = [
        {
            **json.loads((raw / f"hf-{n}.result.json").read_text()),
            "config": n,
            "attn": "sdpa",
            "trainingArgumentsSet": {},
        }
        for n in ("liger-m8", "compile")
    ]
    hf.append(
        {
            "config": "broken",
            "microBatch": 2,
            "gradAccum": 4,
            "attn": "sdpa",
            "trainingArgumentsSet": {},
            "failed": "rc 1",
        }
    )
    v = tm.parse_variant("plain-fused-m8:micro=8,accum=1,fusedLoss=true", 2, 4)
    row = gpu_matrix.native_row(v, nat, "llama-3.2-1b", 4096, 3)
    # 6N + 12·L·H·Q·T against the causal count 6N + 6·L·H·Q·T (16 layers, 32 heads of 64).
    assert row["flopsPerTokenFull"] - row["flopsPerTokenCausal"] == 6 * 16 * 32 * 64 * 4096
    assert row["mfuCausal"] < row["mfu"]
    args = argparse.Namespace(
        seq=4096, ac="none", tiny=False, suite="throughput", warmup=3, layers=0, prefix=""
    )
    items = gpu_matrix.measurements(
        args, "h100: 1x NVIDIA H100 80GB HBM3", "llama-3.2-1b", [row], {v.name: nat}, hf, None
    )
    for m in items:
        common.validate(m)
    by = {m["name"]: m for m in items}
    ratio = by["train.native.vs_hf_trainer"]
    assert ratio["baselineValue"] == max(h["tokensPerSec"] for h in hf if "tokensPerSec" in h)
    assert "liger-m8" in ratio["baselineName"]
    assert by["train.hf.broken"]["value"] == 0.0
    assert by["train.native.mfu"]["goal"]["target"] == 0.60
