"""A SIGTERM to a real torchrun run (what the kubelet sends on a spot interruption, a drain,
a preemption, the run's deadline): the ranks finish their step, commit a checkpoint to the
loopback S3 server, and ``cpt-torchrun`` exits with EXIT_PREEMPTED; the next attempt resumes
from that checkpoint, so at most the one step in flight is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cpt_training import storage
from cpt_training.checkpoint import list_committed
from cpt_training.metrics import parse_metrics_lines
from cpt_training.preemption import EXIT_PREEMPTED
from cpt_training.testing import TinyAssets, make_tiny_assets, native_train_config

pytestmark = pytest.mark.integration

CPT_TORCHRUN = str(Path(sys.executable).parent / "cpt-torchrun")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    return make_tiny_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def s3_env(s3: Any) -> Iterator[dict[str, str]]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env.items():
            mp.setenv(k, v)
        yield dict(s3.env)


def _start(cfg: dict[str, Any], env: dict[str, str], tmp: Path) -> subprocess.Popen[str]:
    """The run, its stderr into ``tmp/stderr.log`` (stdout is read line by line)."""
    return subprocess.Popen(
        [CPT_TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "cpt_training.cli", "train"],
        env={
            **os.environ,
            **env,
            "CPT_STAGE_CONFIG": json.dumps(cfg),
            "OMP_NUM_THREADS": "1",
            "CPT_STOP_MARKER": str(tmp / "stopped"),
            "PET_SHUTDOWN_TIMEOUT": "120",
        },
        stdout=subprocess.PIPE,
        stderr=(tmp / "stderr.log").open("w"),
        text=True,
    )


def _read_until_step(proc: subprocess.Popen[str], step: int) -> tuple[list[str], int]:
    """stdout lines until a metrics line of `step` or later; (lines, that step)."""
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        metrics = parse_metrics_lines(line)
        if metrics and metrics[-1]["step"] >= step:
            return lines, int(metrics[-1]["step"])
    raise AssertionError(f"the run ended before step {step}")


def test_sigterm_mid_run_commits_the_current_step_exits_preempted_and_resumes_there(
    assets: TinyAssets, s3: Any, s3_env: dict[str, str], tmp_path: Path
) -> None:
    root = f"s3://{s3.new_bucket()}/runs/preempt/ckpt"
    max_steps = 400  # far more than the test waits for: the signal lands mid-run

    def cfg(attempt: int, **kw: Any) -> dict[str, Any]:
        local = tmp_path / f"attempt-{attempt}"
        ckpt = {"uri": root, "everySteps": 100, "keep": 2, "localDir": str(local)}
        return native_train_config(
            assets, root, local, max_steps, attempt=attempt, checkpoint=ckpt, **kw
        )

    proc = _start(cfg(1), s3_env, tmp_path)
    lines, seen = _read_until_step(proc, 3)
    proc.send_signal(signal.SIGTERM)  # to the agent only, as the kubelet does
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=300)
    stderr = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-6000:]
    logged = [m["step"] for m in parse_metrics_lines("".join(lines) + out)]
    stopped = max(logged)
    # The step in flight when the signal came was finished and committed, nothing after it.
    assert stopped >= seen and stopped < max_steps
    assert [c.step for c in list_committed(root, settings=None)] == [stopped]
    progress = storage.read_json(storage.join_uri(root, "progress.json"))
    assert progress["lastCommittedStep"] == stopped and progress["done"] is False
    assert progress["stoppedAtStep"] == stopped
    assert "stop requested (SIGTERM)" in stderr, stderr[-3000:]
    assert time.monotonic() - t0 < 120  # well inside the shutdown timeout (no SIGKILL)

    # Attempt 2 (a new node: empty local dir) resumes from exactly that step.
    second = subprocess.run(
        [CPT_TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "cpt_training.cli", "train"],
        env={
            **os.environ,
            **s3_env,
            "CPT_STAGE_CONFIG": json.dumps(cfg(2, stopAfterSteps=2)),
            "OMP_NUM_THREADS": "1",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-6000:]
    assert [m["step"] for m in parse_metrics_lines(second.stdout)] == [stopped + 1, stopped + 2]
    assert f"step_{stopped}" in second.stderr and "resumed from" in second.stderr


def test_a_run_that_fails_keeps_torchruns_own_exit_code(assets: TinyAssets, tmp_path: Path) -> None:
    """No stop marker: a failure is not reported as a preemption."""
    bad = native_train_config(assets, str(tmp_path / "ckpt"), tmp_path / "local", 4)
    bad["dataUri"] = str(tmp_path / "no-such-data")
    proc = subprocess.run(
        [CPT_TORCHRUN, "--standalone", "--nproc-per-node=1", "-m", "cpt_training.cli", "train"],
        env={**os.environ, "CPT_STAGE_CONFIG": json.dumps(bad), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode not in (0, EXIT_PREEMPTED), proc.stderr[-3000:]
