"""Find the project's helm binary and render the cpt chart; shared by tests and `make chart`.

The helm binary is the one hack/devcluster/build.sh builds (pinned v3.21.4), found without
running the build: ``$CPT_HELM``, else the cache directory build.sh would use (same key), else
``helm`` on PATH. Usage: ``python hack/chart/render.py [helm template args...]``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "cpt"
DEVCLUSTER = REPO / "hack" / "devcluster"
# The version the chart's kubeVersion is checked against when rendering offline: the one the
# local control plane runs (helm's offline default is far older than the chart's minimum).
KUBE_VERSION = "1.34.0"


class HelmNotFound(RuntimeError):
    """No helm binary: run `make cluster-build` (or set CPT_HELM)."""


def devcluster_bin_dir() -> Path:
    """The bin directory hack/devcluster/build.sh caches into (its key, recomputed)."""
    parts = sorted(DEVCLUSTER.glob("*/go.mod")) + sorted(DEVCLUSTER.glob("*/go.sum"))
    digest = hashlib.sha256()
    for part in [*parts, DEVCLUSTER / "build.sh"]:
        digest.update(part.read_bytes())
    return _cache_dir() / f"devcluster-{digest.hexdigest()[:16]}" / "bin"


def _cache_dir() -> Path:
    explicit = os.environ.get("CPT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cpt"


def find_helm() -> Path:
    """Path of the helm binary to use; raises HelmNotFound with the fix when there is none."""
    explicit = os.environ.get("CPT_HELM")
    if explicit:
        return Path(explicit)
    built = devcluster_bin_dir() / "helm"
    if built.is_file() and os.access(built, os.X_OK):
        return built
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    raise HelmNotFound(f"no helm at {built} nor on PATH: run `make cluster-build` or set CPT_HELM")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm with an isolated config/cache so the user's repos and plugins never interfere."""
    home = _cache_dir() / "helm-home"
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return subprocess.run(
        [str(find_helm()), *args], check=check, capture_output=True, text=True, env=env
    )


def template(
    *args: str,
    release: str = "cpt",
    namespace: str = "cpt-system",
    chart: Path = CHART_DIR,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with a fixed release, namespace and Kubernetes version."""
    return helm(
        "template", release, str(chart), "--namespace", namespace,
        "--kube-version", KUBE_VERSION, *args, check=check,
    )  # fmt: skip


def render_objects(*args: str, **kwargs: Any) -> list[dict[str, Any]]:
    """The rendered manifests as a list of dicts (empty documents dropped)."""
    out = template(*args, **kwargs).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def main(argv: list[str]) -> int:
    try:
        proc = template(*argv, check=False)
    except HelmNotFound as exc:
        print(exc, file=sys.stderr)
        return 2
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
