"""A real node for the local control plane: a kubelet with containerd and runc on this host.

    python hack/node/node.py up     # the control plane (hack/devcluster) must be up
    python hack/node/node.py down   # stops it and puts the host back as it was
    python hack/node/node.py import ARCHIVE.json...   # images from hack/images/imagebuild.py

The control plane's other nodes are KWOK fakes; this one runs pods as real containers, so
what only a container shows (entry points, packages, a read-only root filesystem, the user,
the ServiceAccount token, cgroup limits) is tested. Only pods that ask land here: the node
carries the label and NoSchedule taint ``cpt.dev/real-node=true``.

A kubelet is effectively one per host (it owns cgroup roots, sysctls, /var/log/containers),
so ``up``/``down`` run under a host-wide lock and a second checkout waits. Everything this
module can put under its own state directory is there (kubelet root dir, pod logs, containerd
root/state/socket, CNI config and IP leases); what cannot be (sysctls the kubelet sets, the
pods' cgroup root in every hierarchy, the bridge, /run/netns, /var/log/containers,
/var/lib/cni) is recorded before ``up`` and restored by ``down`` (`HostSnapshot`).

Networking: pods get their own network namespace on a bridge (`BRIDGE`, `POD_SUBNET`) through
the Debian CNI plugins. The apiserver and the S3 server listen on loopback, so the host also
answers on the bridge's gateway address and on the ``kubernetes`` Service's ClusterIP, and a
forwarder process (forward.py) passes those connections to loopback: in-cluster config
(``KUBERNETES_SERVICE_HOST``) works exactly as on a cluster with kube-proxy.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "hack" / "devcluster")]

import devcluster  # noqa: E402
from hoststate import (  # noqa: E402
    CGROUP_FS,
    CGROUP_ROOT,
    HostSnapshot,
    _links,
    make_cgroup_root,
    restore,
    unmount_under,
)

LABEL = "cpt.dev/real-node"
TAINT = {"key": LABEL, "value": "true", "effect": "NoSchedule"}
BRIDGE = "cpt0"
POD_SUBNET = "10.89.0.0/24"
GATEWAY = "10.89.0.1"
RUNC = "/usr/sbin/runc"
CNI_BIN = "/usr/lib/cni"
CNI_NETWORK = "cpt-node"
HOST_LOCK = Path("/run/lock/cpt-node.lock")
PAUSE_REF = "localhost/cpt-pause:1"
NAMESPACE = "k8s.io"  # containerd's namespace for the CRI
# Binaries the node needs from the host (hack/node/host-setup.sh installs them).
HOST_TOOLS = ("containerd", "ctr", RUNC, f"{CNI_BIN}/bridge", f"{CNI_BIN}/host-local", "ip")


class NodeError(RuntimeError):
    """The node could not be started or stopped; the message says which step and why."""


# ----------------------------------------------------------------------------- processes


_alive = devcluster._alive  # a zombie counts as dead, like the control plane's


@dataclass
class Node:
    """The node's state directory and processes (containerd, kubelet, forwarder)."""

    root: Path

    @property
    def name(self) -> str:
        return socket.gethostname()

    @property
    def socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def snapshot_file(self) -> Path:
        return self.root / "host-before.json"

    def pid_file(self, name: str) -> Path:
        return self.root / f"{name}.pid"

    def pid_of(self, name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file(name).read_text())
            if _alive(pid):
                return pid
        return None

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.pid_file(name).write_text(str(proc.pid))
        return proc.pid

    def stop(self, name: str, *, grace: float = 15) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; by the recorded PID only."""
        pid = self.pid_of(name)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pid_file(name).unlink(missing_ok=True)

    def ctr(self, *args: str, check: bool = True) -> str:
        argv = ["ctr", f"--address={self.socket}", f"--namespace={NAMESPACE}", *args]
        res = subprocess.run(argv, capture_output=True, text=True, check=False)
        if check and res.returncode != 0:
            raise NodeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
        return res.stdout


@contextlib.contextmanager
def host_lock(timeout: float = 1800) -> Iterator[None]:
    """The host-wide lock: one real node per host (waits for another checkout's)."""
    HOST_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(HOST_LOCK, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise NodeError(f"another checkout holds {HOST_LOCK}") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def missing_capabilities() -> list[str]:
    """What this host lacks to run the node; empty when it can."""
    out = []
    if os.geteuid() != 0:
        out.append("root (the kubelet and containerd need it)")
    if not (CGROUP_FS / "memory").is_dir() and not (CGROUP_FS / "cgroup.controllers").exists():
        out.append("a cgroup filesystem with the memory controller at /sys/fs/cgroup")
    for tool in HOST_TOOLS:
        if not (Path(tool).exists() if tool.startswith("/") else _which(tool)):
            out.append(f"{tool} (hack/node/host-setup.sh installs it)")
    with contextlib.suppress(OSError):
        if not socket.gethostbyname(socket.gethostname()).startswith("127."):
            out.append(
                f"the hostname {socket.gethostname()!r} resolving to loopback (the apiserver "
                "dials the node by name for `kubectl logs`; the kubelet listens on 127.0.0.1)"
            )
    return out


def _which(tool: str) -> bool:
    return any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(":") if d)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    return devcluster.wait_for(predicate, timeout=timeout, what=what)


# ----------------------------------------------------------------------------- lifecycle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ip(*args: str, check: bool = True) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise NodeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


def _setup_network() -> None:
    """The bridge with the gateway and the `kubernetes` Service's ClusterIP on the host side."""
    if BRIDGE not in _links():
        _ip("link", "add", BRIDGE, "type", "bridge")
    prefix = POD_SUBNET.split("/")[1]
    _ip("addr", "replace", f"{GATEWAY}/{prefix}", "dev", BRIDGE)
    _ip("addr", "replace", f"{devcluster.SERVICE_IP}/32", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def start_containerd(node: Node) -> None:
    from nodeconfig import cni_conflist, containerd_toml

    cdir = node.root / "containerd"
    cni_conf = node.root / "cni" / "net.d"
    cni_conf.mkdir(parents=True, exist_ok=True)
    (cni_conf / "10-cpt-node.conflist").write_text(
        cni_conflist(CNI_NETWORK, BRIDGE, POD_SUBNET, GATEWAY, node.root / "cni" / "ipam")
    )
    cdir.mkdir(parents=True, exist_ok=True)
    conf = cdir / "config.toml"
    conf.write_text(containerd_toml(cdir, node.socket, PAUSE_REF, cni_conf, CNI_BIN))
    node.start("containerd", ["containerd", f"--config={conf}"])
    wait_for(
        lambda: node.socket.exists() and node.ctr("version", check=False),
        timeout=30,
        what=f"containerd on {node.socket} (log: {node.logs}/containerd.log)",
    )


def import_pause(node: Node, kubelet_bin: Path) -> None:
    """The sandbox image: the pause binary built beside the kubelet, in an OCI archive."""
    archive = kubelet_bin / "pause.oci.tar"
    if not archive.exists():
        ctr = subprocess.run(
            ["buildah", "from", "scratch"], capture_output=True, text=True, check=True
        ).stdout.strip()
        try:
            for argv in (
                ["buildah", "copy", ctr, str(kubelet_bin / "pause"), "/pause"],
                ["buildah", "config", "--entrypoint", '["/pause"]', "--user", "65535:65535", ctr],
                ["buildah", "commit", ctr, PAUSE_REF],
                ["buildah", "push", "-D", PAUSE_REF, f"oci-archive:{archive}.part:{PAUSE_REF}"],
            ):
                subprocess.run(argv, capture_output=True, check=True)
        finally:
            subprocess.run(["buildah", "rm", ctr], capture_output=True, check=False)
        Path(f"{archive}.part").replace(archive)
    import_archive(node, archive, [PAUSE_REF])


def _archive_digest(archive: Path) -> str:
    """The digest of the (single) image manifest in an OCI archive's index.json."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        if member is None:
            raise NodeError(f"{archive} has no index.json")
        return str(json.load(member)["manifests"][0]["digest"])


def _image_digests(node: Node) -> dict[str, str]:
    out = {}
    for line in node.ctr("images", "ls").splitlines()[1:]:
        words = line.split()
        if len(words) >= 3:
            out[words[0]] = words[2]
    return out


def import_archive(node: Node, archive: Path, refs: list[str]) -> None:
    """Imports (and unpacks) an OCI archive under its first ref and tags the others; a no-op
    when every ref already names this archive's image (same manifest digest)."""
    want = _archive_digest(archive)
    have = _image_digests(node)
    if all(have.get(r) == want for r in refs):
        return
    first = refs[0]
    if have.get(first) != want:
        node.ctr("images", "import", f"--base-name={first.rsplit(':', 1)[0]}", str(archive))
        if _image_digests(node).get(first) != want:
            raise NodeError(f"importing {archive} did not make {first} its image {want}")
    for ref in refs[1:]:
        node.ctr("images", "tag", "--force", first, ref)


def import_images(node: Node, manifests: list[Path]) -> None:
    for manifest in manifests:
        info = json.loads(manifest.read_text())
        import_archive(node, Path(info["archive"]), list(info["refs"]))


def start_forwarder(
    node: Node, name: str, listen: tuple[str, int], target: tuple[str, int]
) -> None:
    """A TCP forwarder from a host address pods can reach to a loopback-only server."""
    node.stop(f"forward-{name}")
    node.start(
        f"forward-{name}",
        [
            sys.executable,
            str(HERE / "forward.py"),
            f"{listen[0]}:{listen[1]}",
            f"{target[0]}:{target[1]}",
        ],
    )
    wait_for(lambda: _connects(listen), timeout=10, what=f"forwarder {name} on {listen}")


def start_dns(node: Node) -> None:
    """Cluster DNS for the pods (clusterdns.py): the `kubernetes` Service's names."""
    svc = devcluster.SERVICE_IP
    names = ["kubernetes.default.svc.cluster.local", "kubernetes.default.svc",
             "kubernetes.default"]  # fmt: skip
    node.stop("dns")
    node.start(
        "dns",
        [sys.executable, str(HERE / "clusterdns.py"), GATEWAY, *(f"{n}={svc}" for n in names)],
    )
    wait_for(lambda: _resolves("kubernetes.default.svc.cluster.local", svc), timeout=10,
             what="the node's cluster DNS")  # fmt: skip


def _resolves(name: str, want: str) -> bool:
    import clusterdns as dns

    query = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    query += struct.pack("!HH", dns.TYPE_A, dns.CLASS_IN)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        try:
            s.sendto(query, (GATEWAY, 53))
            reply = s.recv(512)
        except OSError:
            return False
    return reply[-4:] == socket.inet_aton(want)


def _connects(addr: tuple[str, int]) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(addr, 0.5):
        return True
    return False


def start_kubelet(node: Node, cluster: devcluster.Cluster, kubelet_bin: Path) -> None:
    from nodeconfig import kubeconfig, kubelet_config

    kdir = node.root / "kubelet"
    kdir.mkdir(parents=True, exist_ok=True)
    (node.root / "pod-logs").mkdir(exist_ok=True)
    conf = node.root / "kubelet-config.json"
    conf.write_text(
        kubelet_config(
            sock=node.socket,
            port=_free_port(),
            healthz_port=_free_port(),
            pod_logs=node.root / "pod-logs",
            cgroup_root=CGROUP_ROOT,
            cluster_dns=GATEWAY,
            taint=TAINT,
        )
    )
    kc = node.root / "kubelet.kubeconfig"
    kc.write_text(kubeconfig(cluster.api_url, cluster.ca_file, cluster.admin_token))
    kc.chmod(0o600)
    node.start(
        "kubelet",
        [
            str(kubelet_bin / "kubelet"),
            f"--config={conf}",
            f"--kubeconfig={kc}",
            f"--root-dir={kdir}",
            f"--cert-dir={kdir / 'pki'}",
            f"--hostname-override={node.name}",
            f"--node-ip={GATEWAY}",
            f"--node-labels={LABEL}=true",
            "--v=1",
        ],
    )


def node_ready(cluster: devcluster.Cluster, name: str) -> bool:
    node = cluster.api.get_or_none(f"/api/v1/nodes/{name}")
    conds = (node or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def up(node: Node, cluster: devcluster.Cluster, kubelet_bin: Path, timeout: float = 120) -> None:
    """Starts containerd, the forwarder to the apiserver and the kubelet; waits for Ready.
    Records the host's state first (restored by `down`). Call under `host_lock`."""
    if node.pid_of("kubelet") and node.pid_of("containerd") and node_ready(cluster, node.name):
        return
    if node.snapshot_file.exists():
        down(node, cluster)  # a previous session died half-way: restore before recording
    node.root.mkdir(parents=True, exist_ok=True)
    node.snapshot_file.write_text(json.dumps(HostSnapshot.take(node.root).to_json()))
    try:
        make_cgroup_root()
        _setup_network()
        start_containerd(node)
        import_pause(node, kubelet_bin)
        port = int(cluster.api_url.rsplit(":", 1)[1])
        start_forwarder(node, "apiserver", (devcluster.SERVICE_IP, 443), ("127.0.0.1", port))
        start_dns(node)
        start_kubelet(node, cluster, kubelet_bin)

        def ready() -> bool:
            if node.pid_of("kubelet") is None:
                tail = "\n".join((node.logs / "kubelet.log").read_text().splitlines()[-20:])
                raise NodeError(f"the kubelet exited; last lines of its log:\n{tail}")
            return node_ready(cluster, node.name)

        wait_for(ready, timeout=timeout, what=f"node {node.name} Ready")
    except BaseException:
        down(node, cluster)
        raise


def _pods_on(cluster: devcluster.Cluster, name: str) -> list[dict[str, Any]]:
    pods = cluster.api.get(f"/api/v1/pods?fieldSelector=spec.nodeName={name}")
    return list(pods.get("items") or [])


def _drain(node: Node, cluster: devcluster.Cluster, timeout: float = 60) -> None:
    """Deletes the node's pods and lets the kubelet stop them (sandboxes, CNI DEL, mounts)."""
    for pod in _pods_on(cluster, node.name):
        meta = pod["metadata"]
        cluster.api.delete(
            f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", gracePeriodSeconds=0
        )
    with contextlib.suppress(TimeoutError):
        wait_for(
            lambda: not node.ctr("tasks", "ls", "-q", check=False).split(),
            timeout=timeout,
            what="the node's containers to stop",
        )


def _kill_leftover_tasks(node: Node) -> None:
    for cid in node.ctr("tasks", "ls", "-q", check=False).split():
        node.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
    time.sleep(0.5)
    for cid in node.ctr("tasks", "ls", "-q", check=False).split():
        node.ctr("tasks", "delete", "-f", cid, check=False)
    for cid in node.ctr("containers", "ls", "-q", check=False).split():
        node.ctr("containers", "delete", cid, check=False)


def _our_shims(node: Node) -> list[int]:
    """containerd-shim processes serving this node's containerd (they outlive it)."""
    out = []
    needle = str(node.socket).encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
    return out


def down(node: Node, cluster: devcluster.Cluster | None) -> list[str]:
    """Stops the node and restores the host; returns what still differs from before `up`
    (empty when the host is as it was)."""
    if cluster is not None and node.pid_of("kubelet") and node.pid_of("containerd"):
        with contextlib.suppress(Exception):
            _drain(node, cluster)
    node.stop("kubelet")
    if cluster is not None:
        with contextlib.suppress(Exception):
            cluster.api.delete(f"/api/v1/nodes/{node.name}")
    if node.pid_of("containerd"):
        _kill_leftover_tasks(node)
    node.stop("containerd")
    for pid in _our_shims(node):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid_file in [*node.root.glob("forward-*.pid"), node.pid_file("dns")]:
        node.stop(pid_file.stem)
    unmount_under(str(node.root))
    if not node.snapshot_file.exists():
        return []
    before = HostSnapshot.from_json(json.loads(node.snapshot_file.read_text()))
    restore(node.root, before)
    diffs = before.differences(HostSnapshot.take(node.root))
    if not diffs:
        node.snapshot_file.unlink()
    return diffs


def default_root() -> Path:
    return Path(devcluster.default_state_dir()) / "node"


def kubelet_bin_dir() -> Path:
    """hack/node/build.sh's bin directory (builds it, 4-8 min cold, when missing)."""
    cmd = ["bash", str(HERE / "build.sh")]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise NodeError(f"hack/node/build.sh failed (exit {res.returncode})")
    return Path(lines[-1])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="The local real node (kubelet + containerd).")
    parser.add_argument("command", choices=["up", "down", "import", "status"])
    parser.add_argument("manifests", nargs="*", type=Path, help="image.json files (import)")
    args = parser.parse_args(argv)
    node = Node(default_root())
    cluster = devcluster.State(devcluster.default_state_dir()).cluster()
    if args.command == "status":
        print(
            json.dumps(
                {
                    "kubelet": node.pid_of("kubelet"),
                    "containerd": node.pid_of("containerd"),
                    "ready": bool(cluster and node_ready(cluster, node.name)),
                }
            )
        )
        return 0
    if args.command == "down":
        with host_lock():
            diffs = down(node, cluster)
        for d in diffs:
            print(f"node: host differs from before `up`: {d}", file=sys.stderr)
        return 1 if diffs else 0
    if missing := missing_capabilities():
        print(f"node: this host lacks {'; '.join(missing)}", file=sys.stderr)
        return 1
    if cluster is None:
        print("node: the control plane is not up (make cluster-up)", file=sys.stderr)
        return 1
    with host_lock():
        if args.command == "up":
            up(node, cluster, kubelet_bin_dir())
            print(f"node {node.name} Ready (state in {node.root})", file=sys.stderr)
        else:
            import_images(node, args.manifests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
