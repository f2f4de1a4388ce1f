"""Each Dockerfile's install steps, replayed into a fresh virtualenv (no container engine here).

For every image the test reads its Dockerfile and emulates, in a temp dir:

* ``WORKDIR`` and ``COPY`` into a staging tree, honouring ``.dockerignore`` (so a file the
  build needs but the context excludes, or a COPY of a missing path, fails here);
* every ``pip install`` of every ``RUN``, with the same arguments, run by ``uv pip install
  --offline`` into a fresh virtualenv from the local uv cache (no network at test time), with
  container paths mapped into the staging tree. ``--index-url`` is dropped (offline), so the
  CPU image's torch comes from the cached PyPI build of the same version, and
  ``--no-cache-dir`` is dropped (uv reads it as "no cache", and the cache is all it has).
  Other RUN commands (useradd, rm) are not executed;
* what the base image provides, installed first: nothing for ``python:*-slim``; for the Neuron
  DLC its relevant Python packages (torch, transformers, datasets, boto3, ...) at the project's
  locked versions, an approximation (the DLC has older ones, and Python 3.12).

Then, in that virtualenv only: the entry point's executable exists, ``cpt-train --help`` runs,
every module of the packages the image serves imports (from the installed copy, not the
checkout), and the operator image has no torch.

What this proves: the pip lines are valid, their requirement/constraint files are where the
COPYs put them, the dependency set resolves at the locked versions, the package builds from
exactly the copied files, and the entry points work. What it cannot prove: the base images'
own contents (Neuron SDK, CUDA), Python 3.12 in the DLC, or a real ``docker build``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
LOCK = ROOT / "requirements.lock"

# Python packages of the Neuron training DLC that cpt-train uses (see its Dockerfile.neuronx).
DLC_PROVIDES = [
    "torch",
    "transformers",
    "datasets",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
    "boto3",
    "pyyaml",
    "numpy",
    "tensorboard",
]

IMAGES_UNDER_TEST = {
    # image: (base packages, packages whose modules must all import)
    "operator": ([], ["cpt_operator"]),
    "trainer-neuron": (DLC_PROVIDES, ["cpt_training"]),
    "trainer-cuda": ([], ["cpt_training"]),
    "trainer-cpu": ([], ["cpt_training"]),
}

# uv's offline resolver cannot get tensorboard-data-server's metadata from its cache (it wants
# the py3-none-any wheel's), although the wheel itself is cached. Installing that one wheel
# first, at the locked version and without resolution, lets the real steps resolve offline.
OFFLINE_SEED = {"trainer-neuron", "trainer-cuda", "trainer-cpu"}


def _reader():
    spec = importlib.util.spec_from_file_location("cpt_images_dockerfile", IMAGES / "dockerfile.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


df = _reader()


def _uv() -> str:
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv is required (hack/install.sh installs it)")
    return uv


def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, f"{' '.join(argv)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _copy(ignore, src_rel: str, dst: Path) -> None:
    src = ROOT / src_rel
    assert src.exists(), f"COPY source {src_rel} does not exist"
    if src.is_file():
        assert not ignore.excluded(src_rel), f"COPY {src_rel}: excluded by .dockerignore"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        return
    n = 0
    for path in src.rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and not ignore.excluded(rel):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            n += 1
    assert n, f"COPY {src_rel}: nothing left after .dockerignore"


def _stage_path(stage: Path, workdir: str, dst: str) -> Path:
    p = dst if dst.startswith("/") else f"{workdir.rstrip('/')}/{dst}"
    return stage / p.lstrip("/")


def _translate(argv: list[str], stage: Path, python: Path) -> list[str]:
    out, args, i = [], argv[2:], 0
    while i < len(args):
        a = args[i]
        if a in ("--index-url", "-i", "--extra-index-url"):
            i += 2
            continue
        if a.startswith(("--index-url=", "--extra-index-url=")) or a == "--no-cache-dir":
            i += 1  # offline from the uv cache: no index, and the cache must stay on
            continue
        out.append(str(stage / a.lstrip("/")) if a.startswith("/") else a)
        i += 1
    return [_uv(), "pip", "install", "--offline", "--python", str(python), *out]


def replay(name: str, tmp: Path) -> Path:
    """Emulate the image's install steps; returns the virtualenv's python."""
    ignore = df.DockerIgnore((ROOT / ".dockerignore").read_text())
    stage, venv = tmp / "stage", tmp / "venv"
    _run([_uv(), "venv", "--quiet", "--python", sys.executable, str(venv)])
    python = venv / "bin" / "python"
    base, _ = IMAGES_UNDER_TEST[name]
    uv_install = [_uv(), "pip", "install", "--offline", "--python", str(python)]
    if name in OFFLINE_SEED:
        _run([*uv_install, "--no-deps", "-c", str(LOCK), "tensorboard-data-server"])
    if base:
        _run([*uv_install, "-c", str(LOCK), *base])
    workdir = "/"
    pip_steps = 0
    for ins in df.parse(IMAGES / name / "Dockerfile"):
        if ins.cmd == "WORKDIR":
            workdir = ins.args if ins.args.startswith("/") else f"{workdir}/{ins.args}"
            _stage_path(stage, "/", workdir).mkdir(parents=True, exist_ok=True)
        elif ins.cmd == "COPY":
            sources, dst = df.copy_sources(ins.args)
            target = _stage_path(stage, workdir, dst)
            for src in sources:
                if (ROOT / src).is_dir():  # a directory's contents go into dst
                    _copy(ignore, src, target)
                elif dst.endswith("/") or len(sources) > 1:
                    _copy(ignore, src, target / Path(src).name)
                else:
                    _copy(ignore, src, target)
        elif ins.cmd == "RUN":
            for argv in df.pip_installs(ins.args):
                cwd = _stage_path(stage, "/", workdir)
                _run(_translate(argv, stage, python), cwd=cwd)
                pip_steps += 1
    assert pip_steps, f"{name}: no pip install step found"
    return python


def _modules(package: str) -> list[str]:
    pkg_dir = ROOT / ("operator" if package == "cpt_operator" else "training") / package
    mods = []
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = path.relative_to(pkg_dir.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


@pytest.mark.parametrize("name", sorted(IMAGES_UNDER_TEST))
def test_dockerfile_install_steps_work_in_a_fresh_virtualenv(name, tmp_path):
    python = replay(name, tmp_path)
    bindir = python.parent
    entry = df.entrypoint(df.parse(IMAGES / name / "Dockerfile"))
    assert (bindir / entry[0]).exists(), f"{entry[0]} not installed"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    _, packages = IMAGES_UNDER_TEST[name]
    mods = [m for p in packages for m in _modules(p)]
    script = (
        "import importlib, sys, pathlib\n"
        f"mods = {mods!r}\n"
        "for m in mods: importlib.import_module(m)\n"
        "pkg = importlib.import_module(mods[0].split('.')[0])\n"
        "where = pathlib.Path(pkg.__file__).resolve()\n"
        "assert str(where).startswith(sys.prefix), f'imported from {where}, not the venv'\n"
        "print(len(mods), 'modules from', where.parent)\n"
    )
    _run([str(python), "-c", script], cwd=tmp_path, env=env)
    if entry[0] == "cpt-train":
        assert "stage" in _run([str(bindir / "cpt-train"), "--help"], cwd=tmp_path, env=env)
    if name == "operator":
        res = subprocess.run(
            [str(python), "-c", "import torch"], capture_output=True, cwd=tmp_path, env=env
        )
        assert res.returncode != 0, "the operator image must not contain torch"
        _run([str(python), "-c", "import cpt_training.config"], cwd=tmp_path, env=env)
