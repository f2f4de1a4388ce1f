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
