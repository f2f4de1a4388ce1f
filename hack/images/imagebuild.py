"""Builds cpt's images on this host with buildah and exports each as an OCI archive.

    python hack/images/imagebuild.py build [IMAGE...]  # prints each image's manifest path
    python hack/images/imagebuild.py list              # where each archive is (or would be)

Why a second path beside images/build.sh (docker/podman, pushes to a registry): a dev host
or CI machine without a container engine daemon and without a reachable registry can still
build the real images, so the real-container tier (tests/containers/) and `make demo-cluster`
run what `make images` built. What it does differently, and why:

* The base: ``python:3.11.13-slim-bookworm`` where Docker Hub answers; otherwise a base made
  from Debian's own packages with mmdebstrap, from the mirror apt is configured with (Python
  3.11 and pip, Debian's PEP 668 marker removed so pip may install into it). Passed as the
  Dockerfiles' ``BASE`` build argument; the Dockerfiles are the same ones docker builds.
* The torch source: PyTorch's CPU index where it answers, PyPI (the CUDA build) otherwise.
* buildah with runc (crun refuses hybrid cgroup hosts), host networking (no CNI set up on the
  host), the host's CA bundle mounted (egress through a TLS-inspecting proxy), ``--layers`` so
  a source change reuses the multi-GB torch layer.
* Cached by a hash of the Dockerfile, the lock, pyproject.toml, every source file the build
  context admits (.dockerignore), the base and the torch source: a warm call is a stat.
  Archives live under ``$CPT_CACHE_DIR or ~/.cache/cpt`` / ``images/<image>-<key>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack" / "devcluster"))

from devcluster import _flock, cache_dir  # noqa: E402  (the same cache root and lock helper)

PUBLIC_BASE = "python:3.11.13-slim-bookworm"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI_INDEX = "https://pypi.org/simple"
REGISTRY = "ghcr.io/cpt-dev"
RUNC = "/usr/sbin/runc"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# The Debian packages of the registry-less base: the interpreter the slim image has (3.11),
# pip, `python` on PATH (the chart runs `python -m cpt_operator`) and CA certificates.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "python-is-python3", "ca-certificates")
# Images this host can build (the Neuron image's base is on AWS's registry: lint only).
BUILDABLE = ("operator", "trainer-cpu", "trainer-cuda")
DEFAULT = ("operator", "trainer-cpu")
EXTRA_REFS = {"trainer-cpu": ("cpt-tools",)}  # the operator's image for tokenize/export Jobs


class BuildError(RuntimeError):
    """A build step failed; the message names the step and the tail of its output."""


def version() -> str:
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise BuildError("pyproject.toml has no version")


def refs(image: str) -> list[str]:
    """The names the image is imported under: the chart's and the operator's defaults, so the
    chart as rendered and a run without `runtime.images` use it with nothing to pull."""
    names = [f"cpt-{image}", *EXTRA_REFS.get(image, ())]
    return [f"{REGISTRY}/{n}:{version()}" for n in names]


def _dockerfile_reader() -> Any:
    spec = importlib.util.spec_from_file_location(
        "cpt_images_dockerfile", REPO / "images" / "dockerfile.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def context_files() -> list[Path]:
    """Every file of the build context the root .dockerignore admits, sorted."""
    ignore = _dockerfile_reader().DockerIgnore((REPO / ".dockerignore").read_text())
    out = []
    for top in ("pyproject.toml", "requirements.lock", "operator", "training"):
        path = REPO / top
        for f in [path] if path.is_file() else sorted(path.rglob("*")):
            rel = f.relative_to(REPO).as_posix()
            if f.is_file() and not ignore.excluded(rel):
                out.append(f)
    return sorted(out)


def _answers(host: str, port: int = 443, timeout: float = 5) -> bool:
    try:
        with socket.create_connection((host, port), timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Sources:
    """Where the base image and torch come from on this host."""

    base: str
    torch_index: str

    @classmethod
    def detect(cls) -> Sources:
        base = PUBLIC_BASE if _answers("registry-1.docker.io") else local_base()
        index = CPU_TORCH_INDEX if _answers("download.pytorch.org") else PYPI_INDEX
        return cls(base, index)


def image_key(image: str, sources: Sources) -> str:
    h = hashlib.sha256()
    h.update(f"{sources.base}\0{sources.torch_index}\0".encode())
    for f in [REPO / "images" / image / "Dockerfile", *context_files()]:
        h.update(f.relative_to(REPO).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _run(argv: list[str], what: str, *, cwd: Path | None = None) -> str:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-40:])
        raise BuildError(f"{what} failed (exit {res.returncode}): {' '.join(argv)}\n{tail}")
    return res.stdout


def _has_image(ref: str) -> bool:
    res = subprocess.run(
        ["buildah", "inspect", "--type", "image", ref], capture_output=True, check=False
    )
    return res.returncode == 0


def debian_mirror() -> str:
    """The first Debian mirror apt is configured with (deb822 or one-line sources)."""
    for src in [*sorted(Path("/etc/apt/sources.list.d").glob("*")), Path("/etc/apt/sources.list")]:
        with contextlib.suppress(OSError):
            for line in src.read_text().splitlines():
                words = line.split()
                if words[:1] == ["URIs:"] and "security" not in words[1]:
                    return words[1]
                if words[:1] == ["deb"] and "security" not in line:
                    return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def local_base() -> str:
    """A Python base image from Debian packages (mmdebstrap), cached in buildah's storage."""
    mirror = debian_mirror()
    spec = f"{BASE_SUITE} {' '.join(BASE_PACKAGES)} {mirror}"
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    ref = f"localhost/cpt-base:{key}"
    with _flock(cache_dir() / "images" / "base.lock"):
        if _has_image(ref):
            return ref
        t0 = time.monotonic()
        tar = cache_dir() / "images" / f"base-{key}.tar"
        if not tar.exists():
            tmp = tar.with_name(f"{tar.stem}.part.tar")
            _run(
                [
                    "mmdebstrap",
                    "--variant=minbase",
                    "--format=tar",
                    f"--include={','.join(BASE_PACKAGES)}",
                    # pip may install into the system Python (PEP 668), and no apt lists.
                    '--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
                    '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
                    BASE_SUITE,
                    str(tmp),
                    mirror,
                ],
                "mmdebstrap",
            )
            tmp.replace(tar)
        ctr = _run(["buildah", "from", "scratch"], "buildah from scratch").strip()
        try:
            _run(["buildah", "add", ctr, str(tar), "/"], "buildah add base")
            _run(["buildah", "config", "--env", "LANG=C.UTF-8", "--cmd", "python3", ctr], "config")
            _run(["buildah", "commit", "--rm", ctr, ref], "buildah commit base")
        finally:
            subprocess.run(["buildah", "rm", ctr], capture_output=True, check=False)
        print(f"images: base {ref} in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return ref


def archive_dir(image: str, key: str) -> Path:
    return Path(cache_dir()) / "images" / f"{image}-{key}"


def build(image: str, sources: Sources) -> Path:
    """Builds `image` unless its archive for this key exists; returns its manifest path."""
    key = image_key(image, sources)
    out = archive_dir(image, key)
    manifest = out / "image.json"
    if manifest.exists():
        return manifest
    with _flock(cache_dir() / "images" / f"{image}.lock"):
        if manifest.exists():
            return manifest
        t0 = time.monotonic()
        names = refs(image)
        argv = [
            "buildah",
            "bud",
            "--layers",
            "--runtime",
            RUNC,
            "--network",
            "host",
            "--build-arg",
            f"BASE={sources.base}",
            "--build-arg",
            f"TORCH_INDEX={sources.torch_index}",
            "-f",
            f"images/{image}/Dockerfile",
            "-t",
            names[0],
        ]
        if Path(CA_BUNDLE).exists():
            argv += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
        _run([*argv, "."], f"building {image}", cwd=REPO)
        built = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        archive = out / "image.oci.tar"
        tmp = out / "image.oci.tar.tmp"
        tmp.unlink(missing_ok=True)
        # Uncompressed layers: the archive is imported on this host, where gzip would only
        # cost minutes of CPU for the multi-GB trainer.
        _run(["buildah", "push", "-D", names[0], f"oci-archive:{tmp}:{names[0]}"], "export")
        tmp.replace(archive)
        size = archive.stat().st_size
        info: dict[str, Any] = {
            "image": image,
            "key": key,
            "refs": names,
            "archive": str(archive),
            "base": sources.base,
            "torch_index": sources.torch_index,
            "build_seconds": round(built - t0, 1),
            "export_seconds": round(time.monotonic() - built, 1),
            "bytes": size,
        }
        manifest.write_text(json.dumps(info, indent=2) + "\n")
        # Archives of earlier keys are GBs for the trainer: keep this one and the newest other
        # (another checkout of the host, e.g. main beside a branch, may still use it).
        older = [
            d for d in out.parent.glob(f"{image}-*") if d != out and (d / "image.json").exists()
        ]
        for old in sorted(older, key=lambda d: d.stat().st_mtime, reverse=True)[1:]:
            shutil.rmtree(old, ignore_errors=True)
        print(
            f"images: {image} built in {info['build_seconds']} s, exported in "
            f"{info['export_seconds']} s ({size >> 20} MiB)",
            file=sys.stderr,
        )
        return manifest


def missing_tools() -> list[str]:
    need = ["buildah", "mmdebstrap", RUNC]
    return [t for t in need if shutil.which(t) is None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "list"])
    parser.add_argument("images", nargs="*", help=f"default: {' '.join(DEFAULT)}")
    args = parser.parse_args(argv)
    images = args.images or list(DEFAULT)
    for image in images:
        if image not in BUILDABLE:
            parser.error(f"cannot build {image!r} here; buildable: {', '.join(BUILDABLE)}")
    if missing := missing_tools():
        print(f"images: missing {', '.join(missing)} (hack/node/host-setup.sh)", file=sys.stderr)
        return 1
    sources = Sources.detect()
    for image in images:
        if args.command == "list":
            print(archive_dir(image, image_key(image, sources)) / "image.json")
            continue
        try:
            print(build(image, sources))
        except BuildError as exc:
            print(f"images: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
