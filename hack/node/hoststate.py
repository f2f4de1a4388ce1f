"""What the real node changes on the host outside its state directory, recorded and restored.

The kubelet sets sysctls, and the node makes a cgroup root in every hierarchy, a bridge and
veths, network namespaces, mounts, and entries in /var/log/containers and /var/lib/cni.
`HostSnapshot.take` records them before `up`; `restore` puts them back (node.py `down`), and
`HostSnapshot.differences` says what still differs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CGROUP_ROOT = "cpt-node"
CGROUP_FS = Path("/sys/fs/cgroup")
SYSCTLS = ("kernel.panic", "kernel.panic_on_oops", "vm.overcommit_memory", "net.ipv4.ip_forward")
HOST_DIRS = (Path("/var/log/containers"), Path("/var/lib/cni"), Path("/run/netns"))


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, the named systemd one, unified)."""
    return sorted(p for p in CGROUP_FS.iterdir() if p.is_dir() and not p.is_symlink())


def _mountpoints() -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        out.append(line.split()[4].replace("\\040", " "))
    return out


# Where the node's own mounts can appear (its state dir is added per node): pod volumes and
# the kubelet's root under `--root-dir`, sandboxes' network namespaces, containerd's rootfs
# and shm mounts. Anything else (another tool's overlay mounts, e.g. a concurrent buildah
# build) is neither compared nor touched.
NODE_MOUNT_MARKS = ("/run/netns/", "/var/run/netns/", "/var/lib/kubelet", "/run/containerd/")


def _node_mounts(extra_root: str = "") -> list[str]:
    marks = (*NODE_MOUNT_MARKS, *((extra_root.rstrip("/") + "/",) if extra_root else ()))
    return [m for m in _mountpoints() if any(m.startswith(k) or m == k.rstrip("/") for k in marks)]


def _links() -> list[str]:
    res = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False)
    return sorted(line.split(":")[1].strip().split("@")[0] for line in res.stdout.splitlines())


@dataclass(frozen=True)
class HostSnapshot:
    """What the node changes on the host outside its state directory."""

    sysctls: dict[str, str]
    cgroups: list[str]
    mounts: list[str]
    links: list[str]
    dirs: dict[str, list[str] | None]

    @classmethod
    def take(cls, root: Path | None = None) -> HostSnapshot:
        sysctls = {n: _sysctl_path(n).read_text().strip() for n in SYSCTLS}
        cgroups = sorted(str(h / CGROUP_ROOT) for h in _hierarchies() if (h / CGROUP_ROOT).exists())
        dirs = {str(d): sorted(os.listdir(d)) if d.is_dir() else None for d in HOST_DIRS}
        mounts = sorted(_node_mounts(str(root) if root else ""))
        return cls(sysctls, cgroups, mounts, _links(), dirs)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("sysctls", "cgroups", "mounts", "links", "dirs")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostSnapshot:
        return cls(**data)

    def differences(self, other: HostSnapshot) -> list[str]:
        out = []
        for key in ("sysctls", "cgroups", "mounts", "links", "dirs"):
            a, b = getattr(self, key), getattr(other, key)
            if a != b:
                out.append(f"{key}: before {_diff(a, b)}, after {_diff(b, a)}")
        return out


def _diff(a: Any, b: Any) -> Any:
    if isinstance(a, list) and isinstance(b, list):
        return sorted(set(a) - set(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: v for k, v in a.items() if b.get(k) != v}
    return a


def make_cgroup_root() -> None:
    """The kubelet requires its cgroup root to exist in every hierarchy; cpuset children start
    empty in v1, so they get the parent's CPUs and memory nodes."""
    for h in _hierarchies():
        d = h / CGROUP_ROOT
        d.mkdir(exist_ok=True)
        for f in ("cpuset.cpus", "cpuset.mems"):
            if (h / f).exists() and not (d / f).read_text().strip():
                (d / f).write_text((h / f).read_text())


def unmount_under(*roots: str) -> None:
    for mp in sorted(_mountpoints(), key=len, reverse=True):
        if any(mp == r or mp.startswith(r.rstrip("/") + "/") for r in roots):
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


def _remove_cgroups() -> None:
    for h in _hierarchies():
        top = h / CGROUP_ROOT
        if not top.exists():
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
        for d in [*reversed(dirs), top]:
            with contextlib.suppress(OSError):
                d.rmdir()


def restore(root: Path, before: HostSnapshot) -> None:
    """Puts back what `before` recorded: netns and mounts, cgroups, links, sysctls, dirs."""
    now = HostSnapshot.take(root)
    new_mounts = sorted(set(now.mounts) - set(before.mounts), key=len, reverse=True)
    for mp in new_mounts:
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
    _remove_cgroups()
    for link in set(_links()) - set(before.links):
        subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
    for name, value in before.sysctls.items():
        with contextlib.suppress(OSError):
            _sysctl_path(name).write_text(value)
    for d, entries in before.dirs.items():
        path = Path(d)
        if not path.exists():
            continue
        for entry in set(os.listdir(path)) - set(entries or []):
            subprocess.run(["rm", "-rf", "--one-file-system", str(path / entry)], check=False)
        if entries is None:
            with contextlib.suppress(OSError):
                path.rmdir()
