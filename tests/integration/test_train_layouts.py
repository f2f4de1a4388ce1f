"""Issue 21's parallel layouts on CPU: the real train stage under torchrun with gloo, four ranks,
in the layouts the 8-GPU runs use (FSDP2 over all ranks, FSDP2 x tensor parallel 2, tensor
parallel 4), each against the same run on one rank; and a checkpoint saved by four ranks
resumed by two (a restore onto another world size and layout).

The model is the tiny Llama with 4 query and 4 K/V heads, so tensor parallel 4 splits whole
heads; fp32, so the layouts agree to rounding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cpt_training.metrics import parse_metrics_lines
from cpt_training.testing import (
    TinyAssets,
    make_tiny_assets,
    make_tiny_llama,
    native_train_config,
    torchrun_train,
)

pytestmark = pytest.mark.integration

STEPS = 4


def train(cfg: dict[str, Any], nproc: int) -> dict[int, float]:
    """Losses by step of one ``cpt-train train`` run on ``nproc`` CPU ranks."""
    proc = torchrun_train(cfg, nproc)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return {m["step"]: m["loss"] for m in parse_metrics_lines(proc.stdout)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    root = tmp_path_factory.mktemp("layouts")
    assets = make_tiny_assets(root)
    # Four K/V heads (the default tiny model has two), so tensor parallel 4 is a valid layout.
    make_tiny_llama(
        root / "model-kv4", 512, heads=4, kv_heads=4, seq=256, tokenizer_dir=assets.model
    )
    return assets


def config(assets: TinyAssets, tmp: Path, name: str, **kw: Any) -> dict[str, Any]:
    model = Path(assets.model).parent / "model-kv4"
    return native_train_config(
        assets,
        str(tmp / name / "ckpt"),
        tmp / name / "local",
        STEPS,
        modelUri=str(model),
        **kw,
    )


@pytest.fixture(scope="module")
def reference(assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The same run on one rank (micro 2 x accumulation 4)."""
    losses = train(config(assets, tmp_path_factory.mktemp("ref"), "ref"), nproc=1)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.parametrize(
    ("layout", "tp"),
    [("fsdp2-dp4", 1), ("fsdp2-dp2-tp2", 2), ("tp4", 4)],
)
def test_four_ranks_in_each_layout_reproduce_the_one_rank_loss_curve(
    assets: TinyAssets, reference: dict[int, float], tmp_path: Path, layout: str, tp: int
) -> None:
    cfg = config(assets, tmp_path, layout, parallelism={"tensorParallel": tp})
    losses = train(cfg, nproc=4)
    assert sorted(losses) == sorted(reference)
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), (layout, step)


def test_a_checkpoint_of_four_ranks_resumes_on_two_in_another_layout(
    assets: TinyAssets, reference: dict[int, float], tmp_path: Path
) -> None:
    """Saved by FSDP2 x TP2 on four ranks at step 2, resumed by FSDP2 on two ranks: steps 3-4
    reproduce the uninterrupted curve."""
    first = config(assets, tmp_path, "run", parallelism={"tensorParallel": 2}, stopAfterSteps=2)
    first["checkpoint"]["everySteps"] = 2
    assert sorted(train(first, nproc=4)) == [1, 2]
    second = config(assets, tmp_path, "run", attempt=2)
    second["checkpoint"]["everySteps"] = 2
    resumed = train(second, nproc=2)
    assert sorted(resumed) == [3, 4]
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), step
