"""hack/install.sh, as a newcomer meets it: run twice in a plain shell whose PATH is the one
the Makefile sets (no ~/.local/bin), and from a second checkout at the same time.

The script must not depend on uv being on PATH, must give each checkout its own venv (a shared
one re-pointed its editable install at whichever checkout ran last), and must be idempotent.
Uses the machine's uv cache, so it needs the lock's packages downloaded once (make install).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COPIED = ("pyproject.toml", "requirements.lock", "hack/install.sh", "operator", "training")


def _checkout_copy(dest: Path) -> Path:
    """A second checkout: the files the install reads, nothing else."""
    for rel in COPIED:
        src, dst = REPO / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)
    return dest


def _plain_shell_install(checkout: Path) -> subprocess.CompletedProcess[str]:
    """`make install` as the Makefile runs it: PATH = the checkout's .venv/bin + a bare PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{checkout / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    return subprocess.run(
        ["bash", "hack/install.sh"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _origin_of(checkout: Path, module: str) -> str:
    out = subprocess.run(
        [str(checkout / ".venv/bin/python"), "-c", f"import {module}; print({module}.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    return out.stdout.strip()


def test_install_runs_twice_in_a_plain_shell_and_each_checkout_imports_its_own_code(
    tmp_path: Path,
) -> None:
    second = _checkout_copy(tmp_path / "second")
    for attempt in (1, 2):
        proc = _plain_shell_install(second)
        assert proc.returncode == 0, f"install #{attempt} failed:\n{proc.stderr}"
        assert proc.stdout.strip().splitlines()[-1] == str(second / ".venv")
    venv = second / ".venv"
    assert venv.is_dir() and not venv.is_symlink(), "the venv must belong to the checkout"
    assert _origin_of(second, "cpt_operator").startswith(str(second / "operator"))
    # The first checkout's environment is untouched by the second's install.
    if (REPO / ".venv/bin/python").exists():
        assert _origin_of(REPO, "cpt_operator").startswith(str(REPO / "operator"))
    # uv is reachable from the venv (tests that replay installs use it), pinned by the script.
    version = subprocess.run(
        [str(venv / "bin/uv"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    pinned = next(
        line.split("=", 1)[1]
        for line in (REPO / "hack/install.sh").read_text().splitlines()
        if line.startswith("UV_VERSION=")
    )
    assert version.split()[1] == pinned
