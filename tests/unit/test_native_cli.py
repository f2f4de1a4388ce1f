"""``cpt-train``: config loading, validation errors (exit 2, no secrets), dispatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cpt_training import cli
from cpt_training.config import PreflightStage, TrainStage

pytestmark = pytest.mark.unit


def _train_cfg(**kw: Any) -> dict[str, Any]:
    return {
        "stage": "train",
        "modelUri": "/m",
        "dataUri": "/d",
        "checkpoint": {"uri": "/c"},
        **kw,
    }


def test_config_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPT_STAGE_CONFIG", json.dumps(_train_cfg(maxSteps=7)))
    cfg = cli.load_stage_config("train")
    assert isinstance(cfg, TrainStage) and cfg.max_steps == 7


def test_config_file_wins_and_the_stage_field_is_optional(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CPT_STAGE_CONFIG", "not json")
    f = tmp_path / "pf.yaml"
    f.write_text("sizeMb: 2\niterations: 3\n")
    cfg = cli.load_stage_config("preflight", str(f))
    assert isinstance(cfg, PreflightStage) and (cfg.size_mb, cfg.iterations) == (2, 3)


def test_a_config_for_another_stage_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPT_STAGE_CONFIG", json.dumps({"stage": "preflight"}))
    with pytest.raises(cli.ConfigError, match="stage 'preflight' but the command is 'train'"):
        cli.load_stage_config("train")


def test_missing_config_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CPT_STAGE_CONFIG", raising=False)
    with pytest.raises(cli.ConfigError, match="CPT_STAGE_CONFIG"):
        cli.load_stage_config("train")


def test_bad_config_exits_2_naming_fields_without_echoing_values(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "AKIA-super-secret-value"
    bad = _train_cfg(precision="fp8", modelUri=None, runName=secret, bogusField=secret)
    monkeypatch.setenv("CPT_STAGE_CONFIG", json.dumps(bad))
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert "precision" in err and "modelUri" in err and "bogusField" in err
    assert "'bf16' or 'fp32'" in err
    assert secret not in err


def test_invalid_json_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("CPT_STAGE_CONFIG", "{nope")
    assert cli.main(["export-hf"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_dispatch_routes_nxd_training_to_the_nxd_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    calls: list[str] = []
    fake = types.ModuleType("cpt_training.nxd.train")
    fake.run = lambda cfg: calls.append(cfg.backend) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cpt_training.nxd.train", fake)
    import cpt_training.nxd as nxd_pkg

    monkeypatch.setattr(nxd_pkg, "train", fake, raising=False)
    cfg = TrainStage.model_validate(_train_cfg(backend="nxd"))
    assert cli.dispatch("train", cfg) == 0
    assert calls == ["nxd"]


def test_the_console_script_module_runs_and_rejects_unknown_stages() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cpt_training.cli", "frobnicate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


# A thread busy inside torch when the process ends: interpreter finalization stops it inside
# torch's C++ code, which aborts the process ("terminate called without an active exception",
# exit -6) after the stage has finished. torch's own gloo threads can be in that state at the
# end of a training run; a plain spinning thread makes the hazard certain.
_ENTRY_WITH_A_BUSY_TORCH_THREAD = """
import sys, threading, time, torch
from cpt_training import cli

def spin():
    a = torch.randn(256, 256)
    while True:
        a = torch.mm(a, a).clamp_(-1, 1)

threading.Thread(target=spin, daemon=True).start()
time.sleep(0.2)
sys.argv = ["cpt-train", "preflight"]
cli.{call}
"""


def test_the_entry_point_exits_with_the_stage_code_and_its_log_while_torch_threads_run() -> None:
    env = {
        **os.environ,
        "CPT_STAGE_CONFIG": json.dumps(
            {
                "stage": "preflight",
                "device": "cpu",
                "sizeMb": 1,
                "iterations": 1,
                "minBusBandwidthGbps": 1,
            }
        ),
    }
    env.pop("MASTER_ADDR", None)
    proc = subprocess.run(
        [sys.executable, "-c", _ENTRY_WITH_A_BUSY_TORCH_THREAD.format(call="entry()")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    # The stage's own verdict (a world of one has no bus to measure), not an abort.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "a world of 1 process has no bus to measure" in proc.stderr
    assert '"stage": "preflight"' in proc.stdout
    assert "terminate called" not in proc.stderr
