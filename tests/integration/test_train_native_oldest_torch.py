"""The native trainer on the oldest torch cpt supports (hack/oldest-torch.txt: 2.13, the torch
of TorchNeuron 2.33's older wheel family), on CPU: a 2-process torchrun run of a tiny Llama
with DCP checkpoints, then a resumed run that loads them. The environment is a second
virtualenv built by hack/oldest-torch.sh from the locked stack plus that torch; the checkout's
own code is put on its PYTHONPATH. Under CI a missing environment fails the test."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cpt_training.checkpoint import list_committed
from cpt_training.metrics import parse_metrics_lines
from cpt_training.testing import TinyAssets, make_tiny_assets, native_train_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
OLDEST = "2.13"


@pytest.fixture(scope="module")
def oldest_python() -> str:
    proc = subprocess.run(
        [str(ROOT / "hack" / "oldest-torch.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        msg = f"hack/oldest-torch.sh failed: {proc.stderr[-3000:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    python = proc.stdout.strip().splitlines()[-1]
    version = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version.startswith(OLDEST + "."), version
    return python


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    return make_tiny_assets(tmp_path_factory.mktemp("assets"))


def _train(python: str, cfg: dict[str, Any], cache: Path) -> list[dict[str, Any]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "training"), str(ROOT / "operator")]),
        "CPT_STAGE_CONFIG": json.dumps(cfg),
        "CPT_CACHE_DIR": str(cache),
        "OMP_NUM_THREADS": "1",
    }
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [python, *launch, "-m", "cpt_training.cli", "train"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return parse_metrics_lines(proc.stdout)


def _config(assets: TinyAssets, ckpt: Path, local: Path, max_steps: int) -> dict[str, Any]:
    return native_train_config(
        assets,
        str(ckpt),
        local,
        max_steps,
        stopAfterSteps=4 if max_steps > 4 else None,
        activationCheckpointing="selective",
    )


def test_the_native_trainer_trains_and_resumes_on_the_oldest_supported_torch(
    oldest_python: str, assets: TinyAssets, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    cache = tmp_path / "cache"
    # Attempt 1 stops after 4 of 6 steps (a preemption at a checkpoint boundary) ...
    first = _train(oldest_python, _config(assets, ckpt, tmp_path / "local-1", 6), cache)
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    assert first[-1]["loss"] < first[0]["loss"]
    assert [c.tag for c in list_committed(str(ckpt), settings=None)] == ["step_2", "step_4"]
    # ... attempt 2 restores step_4 through DCP on the same torch and finishes.
    second = _train(oldest_python, _config(assets, ckpt, tmp_path / "local-2", 6), cache)
    assert [m["step"] for m in second] == [5, 6]
    assert second[-1]["loss"] < first[0]["loss"]
    assert [c.tag for c in list_committed(str(ckpt), settings=None)] == ["step_4", "step_6"]
