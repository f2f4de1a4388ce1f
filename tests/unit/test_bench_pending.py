"""Trainer changes kept as patches until a GPU measures them (bench/pending/): each still
applies to the tree, and the tests it brings pass on the patched tree, so a patch waiting for
machine time cannot rot unseen."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.cluster import REPO

pytestmark = pytest.mark.unit

PENDING = sorted((REPO / "bench" / "pending").glob("*.patch"))
# What a patched copy needs to import the trainer and run the patch's tests.
COPIED = ("training", "operator", "tests", "hack", "pyproject.toml")


def _changed_tests(patch: Path) -> list[str]:
    out = subprocess.run(
        ["git", "apply", "--numstat", str(patch)], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    paths = [line.split("\t")[2] for line in out.stdout.splitlines()]
    return [p for p in paths if p.startswith("tests/") and Path(p).name.startswith("test_")]


def test_there_is_a_pending_patch_to_check() -> None:
    assert PENDING, "bench/pending/README.md names patches; none found"


@pytest.mark.parametrize("patch", PENDING, ids=[p.name for p in PENDING])
def test_a_pending_patch_applies_and_its_tests_pass_on_the_patched_tree(
    patch: Path, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, tree / name)
    applied = subprocess.run(["git", "apply", str(patch)], cwd=tree, capture_output=True, text=True)
    assert applied.returncode == 0, f"{patch.name} no longer applies: {applied.stderr}"
    tests = _changed_tests(patch)
    assert tests, f"{patch.name} brings no test of its own"
    env = {**os.environ, "PYTHONPATH": f"{tree / 'training'}:{tree / 'operator'}"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    # The patched trainer is the one the tests imported, not the checkout's.
    probe = subprocess.run(
        [sys.executable, "-c", "import cpt_training; print(cpt_training.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip().startswith(str(tree)), probe.stdout + probe.stderr
