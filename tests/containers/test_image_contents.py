"""The images `make images` built, run as real containers (containerd + runc, no kubelet).

For each image: the entry point's executable exists, every module of the packages it serves
imports from the installed copy (not a checkout), `cpt-train --help` runs, the operator image
has no torch, and each runs as the non-root user 65532 with a read-only root filesystem (a
tmpfs at /tmp, as the chart and the operator's pods mount one). These replace the former
replay of the Dockerfiles' pip steps in a virtualenv: the real build proves more (the base,
the COPYs, the build context) and does not depend on uv's offline resolver.
The Neuron image cannot be built here (its base is on AWS's registry): tests/unit/test_images.py
lints and structure-tests it.
"""

from __future__ import annotations

import json

import pytest

from fixtures.cluster import REPO
from fixtures.node import RealNode

pytestmark = pytest.mark.containers

PACKAGES = {"operator": ["cpt_operator"], "trainer-cpu": ["cpt_training", "cpt_operator"]}
ENTRY = {"operator": "kopf", "trainer-cpu": "cpt-train"}


def modules(package: str) -> list[str]:
    pkg_dir = REPO / ("operator" if package == "cpt_operator" else "training") / package
    out = []
    for path in sorted(pkg_dir.rglob("*.py")):
        parts = list(path.relative_to(pkg_dir.parent).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


@pytest.mark.parametrize("image", sorted(PACKAGES))
def test_every_module_imports_from_the_installed_copy_as_the_non_root_user(
    real_node: RealNode, image: str
) -> None:
    mods = [m for p in PACKAGES[image] for m in modules(p)]
    script = (
        "import getpass, importlib, json, os, shutil, sys\n"
        f"mods = {mods!r}\n"
        "for m in mods: importlib.import_module(m)\n"
        "where = importlib.import_module(mods[0].split('.')[0]).__file__\n"
        f"entry = shutil.which({ENTRY[image]!r})\n"
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'where': where,"
        " 'user': getpass.getuser(),"
        " 'entry': entry, 'n': len(mods)}))\n"
    )
    res = real_node.run(image, "python", "-c", script)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert (out["uid"], out["gid"]) == (65532, 65532)
    # kopf's peering identity and torch's inductor cache dir call getpass.getuser(), which
    # raises for a uid without a passwd entry (the operator pod crash-looped on it).
    assert out["user"] == "cpt"
    assert "site-packages" in out["where"] or "dist-packages" in out["where"], out
    assert out["entry"], f"{ENTRY[image]} is not on PATH in {image}"
    assert out["n"] == len(mods)


@pytest.mark.parametrize("image", sorted(PACKAGES))
def test_the_image_entry_point_runs_and_is_the_documented_one(
    real_node: RealNode, image: str
) -> None:
    """The image's own ENTRYPOINT (from its config, not a command the test chooses) starts:
    `--help` of the operator's `kopf run ...` and of `cpt-train`."""
    config = real_node.image_config(image)
    entry = list(config.get("Entrypoint") or [])
    assert entry and entry[0] == ENTRY[image], entry
    assert config.get("User") == "65532:65532"
    res = real_node.run(image, *entry, "--help")
    assert res.returncode == 0, f"{entry}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
    if image == "trainer-cpu":
        assert "stage" in res.stdout


def test_the_operator_image_has_no_torch(real_node: RealNode) -> None:
    res = real_node.run("operator", "python", "-c", "import torch")
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr, res.stderr[-2000:]
