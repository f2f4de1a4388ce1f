"""The README's command output and CLI promises are the real ones.

We test these aspects:
- The README's `cpt plan examples/run.yaml` block is exactly what the command prints (run from
  the repository root, as the README shows it).
- `cpt --version` prints the project's version (pyproject.toml).
- The package installs `kubectl-cpt` (the kubectl plugin form) with the same entry point as
  `cpt`, as the README says.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def cpt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpt_operator.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_readme_plan_output_is_the_commands_output() -> None:
    m = re.search(r"```console\n\$ cpt plan examples/run.yaml\n(.*?)```", README, re.S)
    assert m is not None, "README has no `$ cpt plan examples/run.yaml` console block"
    result = cpt("plan", "examples/run.yaml")
    assert result.returncode == 0, result.stderr
    assert m.group(1) == result.stdout, (
        "README's cpt plan block is stale: paste the output of "
        "`.venv/bin/cpt plan examples/run.yaml` (run from the repository root)"
    )


def test_version_prints_the_project_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    result = cpt("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"cpt {project['version']}"


def test_the_kubectl_plugin_is_the_same_command() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubectl-cpt"] == scripts["cpt"] == "cpt_operator.cli:main"
    assert ".venv/bin/cpt plan examples/run.yaml" in README
