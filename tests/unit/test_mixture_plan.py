"""``cpt plan`` and the data mixture: tokens and epochs per source, repeat warnings."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_operator.api.mixture_plan import mixture_warnings, plan_mixture, render_rows
from cpt_operator.api.models import ContinualPretrainSpec
from cpt_operator.api.planner import plan_object, render_text

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TINY: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())
RUN: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "run.yaml").read_text())


def local_spec(tmp_path: Path, weights: tuple[float, float] | None) -> ContinualPretrainSpec:
    spec = copy.deepcopy(TINY["spec"])
    spec["data"]["sources"] = [
        {"uri": "domain/", "role": "domain"} | ({} if weights is None else {"weight": weights[0]}),
        {"uri": "replay/", "role": "replay"} | ({} if weights is None else {"weight": weights[1]}),
    ]
    spec["checkpoints"]["s3Uri"] = "ckpt/"
    for name, size in (("domain", 400_000), ("replay", 4_000)):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "a.txt").write_bytes(b"x" * size)
    return ContinualPretrainSpec.model_validate(spec)


def test_weighted_shares_give_tokens_and_epochs_per_source_from_the_manifest(
    tmp_path: Path,
) -> None:
    spec = local_spec(tmp_path, (0.9, 0.1))
    data = tmp_path / "ckpt" / "data"
    data.mkdir(parents=True)
    sources = [{"name": "domain", "tokens": 1_000_000}, {"name": "replay", "tokens": 10_000}]
    (data / "manifest.json").write_text(json.dumps({"sources": sources}))
    rows = plan_mixture(spec, 200_000, tmp_path)
    assert [r.exact for r in rows] == [True, True]
    assert rows[0].tokens == pytest.approx(180_000, abs=50)
    assert rows[1].tokens == pytest.approx(20_000, abs=50)
    assert rows[0].epochs == pytest.approx(0.18, abs=1e-3)
    assert rows[1].epochs == pytest.approx(2.0, abs=0.01)
    (warning,) = mixture_warnings(rows)
    assert warning[0] == "spec.data.sources[1]"
    assert "replay is smaller than its share: about 2.0 epochs" in warning[1]
    text = dict(render_rows(rows))
    assert text["data mixture"] == "2 sources"
    assert text["  replay"] == "weight 0.1, 10.0%: 20,020 of 10,000 tokens (2.00 epochs)"


def test_without_a_manifest_local_sizes_are_estimated_from_bytes(tmp_path: Path) -> None:
    rows = plan_mixture(local_spec(tmp_path, None), 50_000, tmp_path)
    assert [r.size_tokens for r in rows] == [100_000, 1_000]
    assert [r.exact for r in rows] == [False, False]
    assert rows[0].share == pytest.approx(100 / 101)  # natural mixture: by size
    assert "est." in dict(render_rows(rows))["  domain"]


def test_weight_zero_is_reported_as_evaluation_only(tmp_path: Path) -> None:
    rows = plan_mixture(local_spec(tmp_path, (1.0, 0.0)), 1000, tmp_path)
    assert rows[1].tokens == 0
    assert mixture_warnings(rows) == [
        ("spec.data.sources[1]", "replay has weight 0: evaluation only, not trained on")
    ]


def test_cpt_plan_prints_the_mixture_for_s3_sources_with_unknown_sizes() -> None:
    doc = copy.deepcopy(RUN)
    src = doc["spec"]["data"]["sources"][0]
    doc["spec"]["data"]["sources"] = [
        src | {"role": "domain", "weight": 0.95},
        {"uri": "s3://corpus/replay/", "role": "replay", "weight": 0.05},
    ]
    result = plan_object(doc)
    assert result.ok, result.errors
    out = render_text(result)
    assert "data mixture   2 sources" in out
    assert (
        "  replay" in out
        and "weight 0.05, 5.0%" in out
        and "0.157 B tokens (source size unknown until tokenized)" in out
    )
    assert result.to_dict()["mixture"][1]["share"] == pytest.approx(0.05, abs=1e-3)


def test_a_single_unweighted_source_adds_no_rows() -> None:
    result = plan_object(RUN)
    assert "data mixture" not in render_text(result)


def test_the_planner_needs_no_numpy_which_the_operator_image_lacks() -> None:
    import subprocess
    import sys

    code = "import sys, cpt_operator.api.planner; assert 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_every_steps_without_held_out_data_is_a_planner_warning() -> None:
    doc = copy.deepcopy(RUN)  # trn1: nxd evaluates during training too
    doc["spec"]["training"]["evalEverySteps"] = 100
    warnings = [str(w) for w in plan_object(doc).warnings]
    assert not any(w.startswith("spec.training.evalEverySteps") for w in warnings)
    doc = yaml.safe_load((ROOT / "examples" / "llama32-1b-p5.yaml").read_text())  # native
    doc["spec"]["training"]["evalEverySteps"] = 100
    doc["spec"]["data"]["heldOutFraction"] = 0
    warnings = [str(w) for w in plan_object(doc).warnings]
    assert any(
        w.startswith("spec.training.evalEverySteps") and "heldOutFraction" in w for w in warnings
    )
    doc["spec"]["data"]["heldOutFraction"] = 0.01
    doc["spec"]["training"]["evalEverySteps"] = 10**6
    warnings = [str(w) for w in plan_object(doc).warnings]
    assert any("evaluated at the last step only" in w for w in warnings)
