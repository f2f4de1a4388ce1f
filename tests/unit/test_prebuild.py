"""The background builds of the test session (tests/fixtures/prebuild.py), with real processes:
the tiers' order, one build after another, a waiting test released when its build ends, and
a build still running at the session's end stopped with its whole process group."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fixtures import prebuild
from fixtures.cluster import REPO

pytestmark = pytest.mark.unit


def _item(path: str, fixtures: tuple[str, ...] = ()) -> Any:
    return SimpleNamespace(path=REPO / "tests" / path, fixturenames=fixtures)


def _build(name: str, script: str) -> prebuild.Build:
    return prebuild.Build(name, ("sh", "-c", script), lambda item: name in item.fixturenames)


def test_tiers_run_cheapest_first_and_a_modules_tests_stay_together() -> None:
    paths = [
        "containers/test_golden_path.py",
        "unit/test_a.py",
        "faults/test_fault_kueue.py",
        "e2e/test_x.py",
        "unit/test_b.py",
        "integration/test_s3.py",
        "parity/test_p.py",
        "e2e/test_y.py",
    ]
    items = [_item(p) for p in paths]
    prebuild.order(items)
    assert [str(i.path.relative_to(REPO / "tests")) for i in items] == [
        "unit/test_a.py",
        "unit/test_b.py",
        "parity/test_p.py",
        "integration/test_s3.py",
        "e2e/test_x.py",
        "e2e/test_y.py",
        "faults/test_fault_kueue.py",
        "containers/test_golden_path.py",
    ]


def test_the_kueue_build_is_wanted_only_by_the_tests_that_run_kueue() -> None:
    kueue = next(b for b in prebuild.BUILDS if b.name == "kueue")
    assert kueue.needed_by(_item("faults/test_fault_kueue.py", ("runs", "kueue_process")))
    assert not kueue.needed_by(_item("faults/test_fault_matrix.py", ("runs",)))


def test_builds_run_one_after_another_and_a_waiting_test_is_released_when_its_own_ends(
    tmp_path: Path,
) -> None:
    order = tmp_path / "order"
    builds = [
        _build("first", f"sleep 0.5; echo first >> {order}"),
        _build("second", f"sleep 1.5; echo second >> {order}"),
    ]
    prebuilds = prebuild.Prebuilds(builds, tmp_path / "logs")
    (tmp_path / "logs").mkdir()
    prebuilds.start()
    prebuilds.wait("first")
    assert order.read_text() == "first\n"  # the second has not ended yet
    assert not prebuilds.done["second"].is_set()
    prebuilds.wait("second")
    assert order.read_text() == "first\nsecond\n"
    prebuilds.wait("not-a-build")  # nothing to wait for


def test_a_build_still_running_at_the_end_is_stopped_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    logs = tmp_path / "logs"
    logs.mkdir()
    builds = [
        _build("slow", f"sleep 300 & echo $! > {pid_file}; wait"),
        _build("never", f"touch {tmp_path / 'ran'}"),
    ]
    prebuilds = prebuild.Prebuilds(builds, logs)
    prebuilds.start()
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    prebuilds.stop()
    prebuilds.wait("never")  # released, not left waiting for a build that will not run
    assert not (tmp_path / "ran").exists()
    assert not logs.exists()
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the build's child outlived the session"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
