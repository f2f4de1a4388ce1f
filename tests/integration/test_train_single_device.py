"""The one-device paths of the native trainer for real (torchrun, one CPU process, a tiny tied
Llama, bf16): the plain module with fp32 master weights (the default on one device) against
FSDP2 on one device (``parallelism.fsdpSingleDevice``), and the chunked fused loss against the
plain head; a checkpoint written by the plain path resumes under FSDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cpt_training.metrics import parse_metrics_lines
from cpt_training.testing import TinyAssets, make_tiny_assets, native_train_config

pytestmark = pytest.mark.integration

STEPS = 8
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    return make_tiny_assets(tmp_path_factory.mktemp("assets"), tie_word_embeddings=True)


def train(assets: TinyAssets, ckpt: Path, **kw: Any) -> dict[int, dict[str, Any]]:
    # 4 accumulation steps on one process (micro 2 of global 8), bf16, a commit every 4 steps
    cfg = native_train_config(assets, str(ckpt), ckpt, STEPS, precision="bf16")
    cfg["checkpoint"]["everySteps"] = 4
    cfg.update(kw)
    proc = subprocess.run(
        [*TORCHRUN, "-m", "cpt_training.cli", "train"],
        env={**os.environ, "CPT_STAGE_CONFIG": json.dumps(cfg), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return {m["step"]: m for m in parse_metrics_lines(proc.stdout)}


@pytest.fixture(scope="module")
def fsdp_run(assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    return train(assets, tmp_path_factory.mktemp("fsdp"), parallelism={"fsdpSingleDevice": True})


def close(a: dict[int, Any], b: dict[int, Any], key: str, rel: float) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert a[step][key] == pytest.approx(b[step][key], rel=rel), (step, key)


def test_the_plain_one_device_path_follows_fsdp_s_loss_curve(
    assets: TinyAssets, fsdp_run: dict[int, Any], tmp_path: Path
) -> None:
    plain = train(assets, tmp_path / "plain")
    # Same fp32 master weights, bf16 compute and fp32 gradient sums: only the order of
    # bf16 roundings differs.
    close(plain, fsdp_run, "loss", 2e-3)
    close(plain, fsdp_run, "grad_norm", 2e-2)
    assert plain[STEPS]["loss"] < plain[1]["loss"] - 0.2  # it trains (6.23 -> 5.81)


def test_the_fused_chunked_loss_follows_the_plain_head(
    assets: TinyAssets, fsdp_run: dict[int, Any], tmp_path: Path
) -> None:
    fused = train(assets, tmp_path / "fused", fusedLoss=True)
    close(fused, fsdp_run, "loss", 2e-3)
    close(fused, fsdp_run, "grad_norm", 2e-2)


def test_a_checkpoint_of_the_plain_path_resumes_under_fsdp(
    assets: TinyAssets, fsdp_run: dict[int, Any], tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    first = train(assets, ckpt, stopAfterSteps=4)
    assert sorted(first) == [1, 2, 3, 4]
    rest = train(assets, ckpt, parallelism={"fsdpSingleDevice": True})
    assert sorted(rest) == list(range(5, STEPS + 1))
    for step in rest:
        assert rest[step]["loss"] == pytest.approx(fsdp_run[step]["loss"], rel=2e-3), step
