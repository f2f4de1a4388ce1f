"""Joining a base-tree and a new-tree run into one results file (bench/ab_trees.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import ab_trees, common

pytestmark = pytest.mark.unit


def _variant(prefix: str, name: str, tps: float) -> dict[str, Any]:
    cfg = {"card": "h100: 1x test", "variant": name}
    return common.measurement(f"{prefix}.native.variant.{name}", "h100", cfg, "tokens/s", tps)


def _raw(losses: list[float]) -> dict[str, Any]:
    steps = [{"step": i + 1, "loss": x} for i, x in enumerate(losses)]
    return {"steps": steps[::-1], "config": {"microBatchSize": 8, "globalBatchSize": 8}}


def test_the_new_tree_is_a_ratio_to_the_base_and_the_curves_are_compared() -> None:
    base = [_variant("b", "base-m8", 100.0)]
    new = [_variant("n", "new-m8", 102.0)]
    curves = {"throughput": (_raw([10.0] * 10), _raw([10.0] * 9 + [10.5]))}
    items = ab_trees.joined("n", base, new, curves)
    by_name = {m["name"]: m for m in items}
    assert "n.base.native.variant.base-m8" in by_name  # one section for both trees
    assert by_name["n.native.new_vs_base"]["ratio"] == pytest.approx(1.02)
    gap = by_name["n.native.numerics.throughput"]
    assert gap["value"] == pytest.approx(0.005)
    assert gap["config"]["card"] == "h100: 1x test"
    assert common.goal_met(gap) is True


def test_a_results_file_without_exactly_one_variant_row_is_refused() -> None:
    with pytest.raises(ValueError, match="one native variant row"):
        ab_trees.joined("n", [], [_variant("n", "x", 1.0)], {})
