"""`cpt plan`, `cpt crds` and `cpt local` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_operator import cli

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RUN = str(ROOT / "examples" / "run.yaml")


def test_cpt_plan_on_the_seed_run_shows_dp16_and_32_microbatches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["plan", RUN]) == 0
    out = capsys.readouterr().out
    assert "TP 8 x PP 8 x DP 16" in out
    assert "32 pipeline microbatches" in out
    assert "! spec.training.optimizer.warmupSteps" in out


def test_cpt_plan_exits_1_with_every_reason_on_an_invalid_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = yaml.safe_load(Path(RUN).read_text())
    doc["spec"]["training"]["globalBatchSize"] = 64
    doc["metadata"]["name"] = "x" * 41
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert cli.main(["plan", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "INVALID spec:" in out
    assert "✗ metadata.name: must be at most 40 characters" in out
    assert "✗ spec.training.globalBatchSize: gives 4 pipeline microbatches" in out


def test_cpt_plan_json_is_machine_readable(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", RUN, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["dataParallel"] == 16
    assert data["plan"]["pipelineMicrobatches"] == 32


def test_cpt_plan_reports_an_unreadable_file_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    assert cli.main(["plan", str(broken)]) == 2
    assert "cpt plan:" in capsys.readouterr().err
    assert cli.main(["plan", str(tmp_path / "missing.yaml")]) == 2


def test_cpt_plan_local_allows_local_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = yaml.safe_load(Path(RUN).read_text())
    doc["spec"]["checkpoints"]["s3Uri"] = str(tmp_path / "ckpt")
    doc["spec"]["output"]["s3Uri"] = str(tmp_path / "out")
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(doc))
    assert cli.main(["plan", str(f)]) == 1
    assert "is a local path, which works only with `cpt local`" in capsys.readouterr().out
    assert cli.main(["plan", str(f), "--local"]) == 0


def test_cpt_crds_check_passes_on_the_committed_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crds", "--root", str(ROOT), "--check"]) == 0


def test_cpt_crds_writes_into_an_empty_root_and_then_checks_clean(tmp_path: Path) -> None:
    assert cli.main(["crds", "--root", str(tmp_path), "--check"]) == 1
    assert cli.main(["crds", "--root", str(tmp_path)]) == 0
    assert (tmp_path / "crds" / "cpt.dev_continualpretrains.yaml").is_file()
    assert (tmp_path / "charts" / "cpt" / "crds" / "cpt.dev_continualpretrains.yaml").is_file()
    assert cli.main(["crds", "--root", str(tmp_path), "--check"]) == 0


def test_cpt_local_says_clearly_when_local_mode_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "cpt_operator.local", None)  # import fails by name
    assert cli.main(["local", RUN]) == 2
    assert "cpt local: this cpt build has no local mode" in capsys.readouterr().err


def test_cpt_local_hands_the_file_and_given_options_to_run_local(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Path, dict[str, Any]]] = []
    fake = types.ModuleType("cpt_operator.local")

    def run_local(path: Path, **opts: Any) -> int:
        calls.append((path, opts))
        return 0

    fake.run_local = run_local  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cpt_operator.local", fake)
    assert cli.main(["local", RUN, "--workdir", "/tmp/w", "--max-steps", "3"]) == 0
    assert calls == [(Path(RUN), {"workdir": "/tmp/w", "max_steps": 3})]


def test_the_cpt_entry_point_is_installed() -> None:
    cpt = Path(sys.executable).parent / "cpt"
    proc = subprocess.run(
        [str(cpt), "plan", RUN, "--json"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plan"]["worldSize"] == 1024
