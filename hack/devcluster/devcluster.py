#!/usr/bin/env python3
"""A real Kubernetes control plane on 127.0.0.1 for cpt's tests and local development.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KWOK (fake kubelets) and the
Kubeflow training-operator run as plain processes, each in its own process group, with logs in
``<state>/logs`` and PIDs in ``<state>/pids``. No container engine is needed: KWOK plays the
kubelets (stages in ``kwok-stages.yaml``) and ``tests/fixtures/executor.py`` runs pods on the
``exec-*`` nodes as local processes.

CLI (stdlib only, runs with the project venv's python)::

    devcluster.py up | down | status | kubeconfig

Importable: ``up()``, ``down()``, ``status()``, ``acquire()``/``release()`` (shared use by
concurrent pytest sessions), ``Cluster`` (kubectl/helm/REST helpers), ``find_bin_dir()``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
K8S_VERSION = "v1.34.4"
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "training-operator",
    "helm",
)
# Start order; stopped in reverse.
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "training-operator",
)
# Preferred loopback ports (a busy one is replaced by a free one at `up`; see cluster.json).
PREFERRED_PORTS = {
    "etcd": 12379,
    "etcd-peer": 12380,
    "apiserver": 16443,
    "controller-manager": 20257,
    "scheduler": 20259,
    "training-operator-health": 20281,
    "training-operator-webhook": 20443,
}
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.0/16"
NODE_MONITOR_GRACE = "20s"
KWOK_LEASE_SECONDS = 20
# The training-operator's cert rotator insists on this fixed path (it only stats tls.crt).
WEBHOOK_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
NOT_READY_LABEL = "test.cpt.dev/node-ready"
NOT_READY_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


class DevClusterError(RuntimeError):
    """The control plane could not be brought to the state asked for."""


class BinariesUnavailable(DevClusterError):
    """The control plane binaries are missing and could not be built."""


class ApiError(DevClusterError):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")


class CommandError(subprocess.CalledProcessError):
    """A CalledProcessError whose message carries stderr, so test failures explain themselves."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip()
        out = (self.stdout or "").strip()
        cmd = " ".join(str(c) for c in self.cmd) if isinstance(self.cmd, list) else str(self.cmd)
        return f"{cmd!r} exited {self.returncode}: {err or out}"


# ----------------------------------------------------------------------------- locations


def default_state_dir() -> Path:
    return Path(os.environ.get("CPT_CLUSTER_DIR") or REPO / ".cluster").resolve()


def cache_dir() -> Path:
    if os.environ.get("CPT_CACHE_DIR"):
        return Path(os.environ["CPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cpt"


def build_key() -> str:
    """The cache key build.sh computes (same files, same order), so no shell-out is needed."""
    h = hashlib.sha256()
    for pattern in ("*/go.mod", "*/go.sum"):
        for name in sorted(glob.glob(str(HERE / pattern))):
            h.update(Path(name).read_bytes())
    h.update((HERE / "build.sh").read_bytes())
    return h.hexdigest()[:16]


def missing_binaries(bin_dir: Path) -> list[str]:
    need = [*BINARIES, "kubeflow.org_pytorchjobs.yaml"]
    return [b for b in need if not (bin_dir / b).exists()]


def find_bin_dir(*, build: bool = True) -> Path:
    """The directory with every binary; runs build.sh (serialised by a lock) when incomplete."""
    override = os.environ.get("CPT_DEVCLUSTER_BIN")
    if override:
        path = Path(override)
        if missing := missing_binaries(path):
            raise BinariesUnavailable(f"CPT_DEVCLUSTER_BIN={path} lacks {', '.join(missing)}")
        return path
    expected = cache_dir() / f"devcluster-{build_key()}" / "bin"
    if not missing_binaries(expected):
        return expected
    if not build:
        raise BinariesUnavailable(f"{expected} lacks {', '.join(missing_binaries(expected))}")
    if shutil.which("go") is None:
        raise BinariesUnavailable("the binaries are not built and `go` is not on PATH")
    cache_dir().mkdir(parents=True, exist_ok=True)
    with _flock(cache_dir() / "devcluster-build.lock"):
        if not missing_binaries(expected):
            return expected
        print(f"devcluster: building control plane binaries into {expected} ...", file=sys.stderr)
        proc = subprocess.run(
            ["bash", str(HERE / "build.sh")], stdout=subprocess.PIPE, text=True, check=False
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise BinariesUnavailable(f"hack/devcluster/build.sh failed (exit {proc.returncode})")
        built = Path(lines[-1])
        if missing := missing_binaries(built):
            raise BinariesUnavailable(f"build.sh finished but {built} lacks {', '.join(missing)}")
        return built


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- REST client


class Api:
    """A minimal Kubernetes REST client (stdlib only) for bootstrap, health checks and tests."""

    def __init__(self, url: str, token: str, ca_file: Path) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.ctx = ssl.create_default_context(cafile=str(ca_file))
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self.ctx)
        )

    def open(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        """Sends one request; returns the HTTP response (caller reads/closes it)."""
        data: bytes | None
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            return self._opener.open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            raise ApiError(e.code, method, path, text) from None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        """Sends one request and returns the decoded JSON body (or text, or None)."""
        with self.open(method, path, body, content_type=content_type, timeout=timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def get_or_none(self, path: str) -> Any:
        try:
            return self.request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def create(self, path: str, obj: dict[str, Any], *, exist_ok: bool = True) -> Any:
        try:
            return self.request("POST", path, obj)
        except ApiError as e:
            if e.status == 409 and exist_ok:
                return None
            raise

    def patch(self, path: str, patch: Any, *, kind: str = "merge") -> Any:
        ctype = {
            "merge": "application/merge-patch+json",
            "strategic": "application/strategic-merge-patch+json",
            "json": "application/json-patch+json",
            "apply": "application/apply-patch+yaml",
        }[kind]
        return self.request("PATCH", path, patch, content_type=ctype)

    def delete(self, path: str, *, missing_ok: bool = True, **options: Any) -> Any:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", **options} if options else None
        try:
            return self.request("DELETE", path, body)
        except ApiError as e:
            if e.status == 404 and missing_ok:
                return None
            raise


def _http_ok(url: str, *, token: str | None = None, timeout: float = 2) -> bool:
    """True if url answers 200 (TLS not verified: health endpoints with self-signed certs)."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
    )
    try:
        with opener.open(req, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


# ----------------------------------------------------------------------------- the cluster handle


@dataclass
class Cluster:
    """A running dev cluster; what tests and tools use (the pytest `cluster` fixture)."""

    state_dir: Path
    bin_dir: Path
    api_url: str
    admin_token: str
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "admin.kubeconfig"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "pki" / "ca.crt"

    @property
    def api(self) -> Api:
        return Api(self.api_url, self.admin_token, self.ca_file)

    def env(self) -> dict[str, str]:
        """Environment for tools that talk to this cluster (kubectl, helm, kopf, the kubernetes client)."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["KUBECACHEDIR"] = str(self.state_dir / "kube-cache")
        for var, sub in (
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ):
            env[var] = str(self.state_dir / "helm" / sub)
        return env

    def _run(
        self, argv: list[str], check: bool, input: str | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        return self._run(argv, check, input, timeout)

    def helm(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / "helm"), f"--kubeconfig={self.kubeconfig}", *args]
        return self._run(argv, check, input, timeout)

    def set_node_ready(self, name: str, ready: bool, *, timeout: float = 60) -> None:
        """Makes a node NotReady (KWOK reports Ready=False) or Ready again, and waits until the
        node lifecycle controller has applied (or lifted) the not-ready taints."""
        labels: dict[str, str | None] = {NOT_READY_LABEL: None if ready else "false"}
        self.api.patch(f"/api/v1/nodes/{name}", {"metadata": {"labels": labels}})
        want = "True" if ready else "False"

        def settled() -> bool:
            node = self.api.get(f"/api/v1/nodes/{name}")
            status = _node_ready_status(node)
            taints = {t["key"] for t in node.get("spec", {}).get("taints") or []}
            tainted = bool(taints & set(NOT_READY_TAINTS))
            return status == want and tainted != ready

        wait_for(settled, timeout=timeout, what=f"node {name} Ready={want}")

    def node_ready(self, name: str) -> bool:
        return _node_ready_status(self.api.get(f"/api/v1/nodes/{name}")) == "True"


def _node_ready_status(node: dict[str, Any]) -> str:
    for cond in node.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("status"))
    return "Missing"


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.2
) -> Any:
    """Polls predicate until truthy (errors count as not yet); raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except DevClusterError as e:
            if not isinstance(e, ApiError):
                raise  # e.g. a component died: waiting longer cannot help
            last = e
        except Exception as e:  # transient connection errors while waiting
            last = e
        if time.monotonic() > deadline:
            extra = f" (last error: {last})" if last else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


# ----------------------------------------------------------------------------- node inventory


def _node(
    name: str,
    instance_type: str,
    resources: dict[str, str],
    *,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": instance_type,
                "topology.kubernetes.io/region": "us-west-2",
                "topology.kubernetes.io/zone": "us-west-2d",
                "type": "kwok",
                **(labels or {}),
            },
        },
        "spec": {"taints": taints or []},
        "status": {
            "allocatable": dict(resources),
            "capacity": dict(resources),
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": K8S_VERSION,
                "kubeProxyVersion": K8S_VERSION,
                "containerRuntimeVersion": "kwok://v0.8.0",
                "kernelVersion": "6.1.0-devcluster",
                "osImage": "cpt devcluster (KWOK fake node)",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        },
    }


def node_inventory() -> list[dict[str, Any]]:
    """The fake nodes: 4 trn1.32xlarge, 2 CPU, 1 p5.48xlarge, 2 executor nodes."""
    trn1 = {
        "cpu": "128",
        "memory": "512Gi",
        "pods": "250",
        "ephemeral-storage": "1Ti",
        "aws.amazon.com/neuron": "16",
        "aws.amazon.com/neuroncore": "32",
        "vpc.amazonaws.com/efa": "8",
    }
    cpu = {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "500Gi"}
    p5 = {
        "cpu": "192",
        "memory": "2048Gi",
        "pods": "250",
        "ephemeral-storage": "1Ti",
        "nvidia.com/gpu": "8",
        "vpc.amazonaws.com/efa": "32",
    }
    local = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "200Gi"}
    nodes = [
        _node(
            f"trn1-{i}",
            "trn1.32xlarge",
            trn1,
            labels={"cpt.dev/pool": "trn1"},
            taints=[{"key": "aws.amazon.com/neuron", "value": "true", "effect": "NoSchedule"}],
        )
        for i in range(4)
    ]
    nodes += [
        _node(f"cpu-{i}", "m5.8xlarge", cpu, labels={"cpt.dev/pool": "cpu"}) for i in range(2)
    ]
    nodes.append(
        _node(
            "p5-0",
            "p5.48xlarge",
            p5,
            labels={"cpt.dev/pool": "gpu"},
            taints=[{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}],
        )
    )
    nodes += [
        _node(
            f"exec-{i}",
            "local-cpu",
            local,
            labels={"cpt.dev/local-executor": "true", "cpt.dev/pool": "exec"},
            taints=[{"key": "cpt.dev/local-executor", "value": "true", "effect": "NoSchedule"}],
        )
        for i in range(2)
    ]
    return nodes


# ----------------------------------------------------------------------------- state on disk


class State:
    """Everything under the state dir: PKI, kubeconfig, pids, logs, cluster.json."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_state_dir()).resolve()
        self.pki = self.root / "pki"
        self.pids = self.root / "pids"
        self.logs = self.root / "logs"
        self.users = self.root / "users"
        self.etcd_data = self.root / "etcd"
        self.info_file = self.root / "cluster.json"
        self.kubeconfig = self.root / "admin.kubeconfig"

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return _flock(self.root / ".lock")

    def info(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.info_file.read_text())
            return data
        except (OSError, ValueError):
            return None

    def write_info(self, info: dict[str, Any]) -> None:
        tmp = self.info_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(self.info_file)

    def cluster(self) -> Cluster | None:
        info = self.info()
        if not info:
            return None
        return Cluster(
            state_dir=self.root,
            bin_dir=Path(info["bin_dir"]),
            api_url=info["api_url"],
            admin_token=info["admin_token"],
            ports={k: int(v) for k, v in info["ports"].items()},
        )

    # -- processes

    def pid_of(self, name: str) -> int | None:
        """The PID of a component if it is alive and still runs our binary (guards PID reuse)."""
        try:
            rec = json.loads((self.pids / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None
        pid = int(rec["pid"])
        for _ in range(100):
            if not _alive(pid):
                return None
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return None
            if cmdline:  # empty for a moment while a just-spawned child finishes exec
                return pid if cmdline.split(b"\0")[0].decode() == rec["exe"] else None
            time.sleep(0.01)
        return None

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"=== {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        (self.pids / f"{name}.pid").write_text(json.dumps({"pid": proc.pid, "exe": argv[0]}))
        return proc.pid

    def stop(self, name: str, *, grace: float = 10) -> None:
        pid = self.pid_of(name)
        pid_file = self.pids / f"{name}.pid"
        if pid is not None:
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                _signal_group(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        pid_file.unlink(missing_ok=True)

    # -- sharing between pytest sessions

    def live_users(self) -> list[int]:
        users = []
        for f in self.users.glob("*") if self.users.exists() else []:
            try:
                pid = int(f.name)
            except ValueError:
                continue
            if _alive(pid):
                users.append(pid)
            else:
                f.unlink(missing_ok=True)
        return users


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead to us


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # each component leads its own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _free_port(preferred: int, taken: set[int]) -> int:
    for candidate in (preferred, 0):
        if candidate in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:  # the wildcard: some components (the training operator's webhook) listen on it
                s.bind(("", candidate))
            except OSError:
                continue
            port = int(s.getsockname()[1])
            if port not in taken:
                return port
    return _free_port(0, taken)


# ----------------------------------------------------------------------------- PKI


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def ensure_pki(state: State) -> str:
    """CA, apiserver serving cert, ServiceAccount signing key pair and the admin token.

    Kept across up/down so kubeconfigs and minted tokens stay valid. Returns the admin token.
    """
    pki = state.pki
    pki.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists():
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=cpt-devcluster-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            cwd=pki,
        )  # fmt: skip
        (pki / "apiserver.crt").unlink(missing_ok=True)
    if not (pki / "apiserver.crt").exists():
        sans = ",".join(
            [
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
                "IP:127.0.0.1",
                f"IP:{SERVICE_IP}",
            ]
        )
        (pki / "apiserver.ext").write_text(
            f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "authorityKeyIdentifier=keyid,issuer\n"
        )
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key",
            "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver", cwd=pki,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "3650", "-out", "apiserver.crt",
            "-extfile", "apiserver.ext", cwd=pki,
        )  # fmt: skip
    if not (pki / "sa.key").exists():
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    token_file = pki / "admin.token"
    if not token_file.exists():
        token_file.write_text(secrets.token_hex(24))
        token_file.chmod(0o600)
    token = token_file.read_text().strip()
    (pki / "tokens.csv").write_text(f'{token},cpt-admin,cpt-admin,"system:masters"\n')
    return token


def ensure_webhook_certs() -> None:
    """A self-signed pair where the training-operator's cert rotator and webhook server look.

    Its content does not matter (no ValidatingWebhookConfiguration points at it); it only has to
    exist and be a valid key pair. Shared by every dev cluster on the host; written atomically.
    """
    crt, key = WEBHOOK_CERT_DIR / "tls.crt", WEBHOOK_CERT_DIR / "tls.key"
    if crt.exists() and key.exists():
        return
    WEBHOOK_CERT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WEBHOOK_CERT_DIR.parent) as tmp:
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            "-keyout", "tls.key", "-out", "tls.crt",
            "-subj", "/CN=training-operator.kubeflow.svc", cwd=Path(tmp),
        )  # fmt: skip
        os.replace(Path(tmp) / "tls.key", key)
        os.replace(Path(tmp) / "tls.crt", crt)


def write_kubeconfig(state: State, api_url: str, token: str) -> None:
    ca = base64.b64encode((state.pki / "ca.crt").read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "cpt-dev", "cluster": {"server": api_url, "certificate-authority-data": ca}}
        ],
        "users": [{"name": "cpt-admin", "user": {"token": token}}],
        "contexts": [
            {
                "name": "cpt-dev",
                "context": {"cluster": "cpt-dev", "user": "cpt-admin", "namespace": "default"},
            }
        ],
        "current-context": "cpt-dev",
    }
    tmp = state.kubeconfig.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(state.kubeconfig)


# ----------------------------------------------------------------------------- component flags


def component_argv(name: str, bin_dir: Path, state: State, ports: dict[str, int]) -> list[str]:
    b = str(bin_dir / name)
    kc = f"--kubeconfig={state.kubeconfig}"
    pki = state.pki
    if name == "etcd":
        client = f"http://127.0.0.1:{ports['etcd']}"
        peer = f"http://127.0.0.1:{ports['etcd-peer']}"
        return [
            b, "--name=devcluster", f"--data-dir={state.etcd_data}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=devcluster={peer}", "--unsafe-no-fsync",
            "--auto-compaction-retention=1", "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ]  # fmt: skip
    if name == "kube-apiserver":
        return [
            b, f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}", f"--cert-dir={pki / 'apiserver-generated'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none",  # Endpoints reject loopback IPs
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            # Pods tolerate a NotReady/unreachable node for 30 s (default 300 s) before eviction.
            "--default-not-ready-toleration-seconds=30",
            "--default-unreachable-toleration-seconds=30",
            # /debug/pprof for benchmarks (bench/operator_bench.py --apiserver-profile).
            "--profiling=" + ("true" if os.environ.get("DEVCLUSTER_PROFILING") else "false"),
            "--v=1",
        ]  # fmt: skip
    if name == "kube-controller-manager":
        return [
            b, kc, f"--authentication-kubeconfig={state.kubeconfig}",
            f"--authorization-kubeconfig={state.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1",
            f"--secure-port={ports['controller-manager']}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--node-monitor-period=2s", f"--node-monitor-grace-period={NODE_MONITOR_GRACE}",
            "--kube-api-qps=100", "--kube-api-burst=200",
            "--profiling=false", "--v=1",
        ]  # fmt: skip
    if name == "kube-scheduler":
        return [
            b, kc, f"--authentication-kubeconfig={state.kubeconfig}",
            f"--authorization-kubeconfig={state.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            "--profiling=false", "--v=1",
        ]  # fmt: skip
    if name == "kwok":
        return [
            b, kc, f"--config={HERE / 'kwok-stages.yaml'}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--node-ip=127.0.0.1", f"--cidr={POD_CIDR}",
            f"--node-lease-duration-seconds={KWOK_LEASE_SECONDS}",
        ]  # fmt: skip
    if name == "training-operator":
        return [
            b, kc, "--enable-scheme=pytorchjob", "--metrics-bind-address=0",
            f"--health-probe-bind-address=127.0.0.1:{ports['training-operator-health']}",
            f"--webhook-server-port={ports['training-operator-webhook']}",
            "--leader-elect=false", "--controller-threads=4",
            "--kube-api-qps=100", "--kube-api-burst=200",
        ]  # fmt: skip
    raise ValueError(f"unknown component {name!r}")


# ----------------------------------------------------------------------------- lifecycle


def _components_alive(state: State) -> bool:
    return all(state.pid_of(c) is not None for c in COMPONENTS)


def healthy(state: State) -> bool:
    """Quick check that a recorded cluster runs and serves (used to decide reuse)."""
    cluster = state.cluster()
    if cluster is None or not _components_alive(state):
        return False
    if not _http_ok(f"{cluster.api_url}/readyz", token=cluster.admin_token):
        return False
    port = cluster.ports["training-operator-health"]
    return _http_ok(f"http://127.0.0.1:{port}/readyz")


def up(
    state_dir: Path | None = None,
    *,
    bin_dir: Path | None = None,
    persistent: bool = True,
    timeout: float = 120,
    log: Callable[[str], None] | None = None,
) -> Cluster:
    """Starts the cluster, or reuses a healthy running one. `persistent` marks a cluster that
    pytest sessions must not stop (started or adopted by `devcluster.py up`)."""
    state = State(state_dir)
    state.root.mkdir(parents=True, exist_ok=True)
    with state.lock():
        return _up_locked(state, bin_dir, persistent, timeout, log or (lambda _m: None))


def _up_locked(
    state: State,
    bin_dir: Path | None,
    persistent: bool,
    timeout: float,
    log: Callable[[str], None],
) -> Cluster:
    if healthy(state):
        info = state.info() or {}
        if persistent and not info.get("persistent"):
            info["persistent"] = True
            state.write_info(info)
        cluster = state.cluster()
        assert cluster is not None
        ensure_nodes(cluster)
        log(f"reusing the running cluster at {cluster.api_url}")
        return cluster

    t0 = time.monotonic()
    bin_dir = bin_dir or find_bin_dir(build=True)
    _stop_all(state)
    shutil.rmtree(state.etcd_data, ignore_errors=True)
    for old in state.logs.glob("*.log") if state.logs.exists() else []:
        old.replace(old.with_suffix(".log.prev"))
    token = ensure_pki(state)
    ensure_webhook_certs()

    taken: set[int] = set()
    ports: dict[str, int] = {}
    for name, preferred in PREFERRED_PORTS.items():
        ports[name] = _free_port(preferred, taken)
        taken.add(ports[name])
    api_url = f"https://127.0.0.1:{ports['apiserver']}"
    write_kubeconfig(state, api_url, token)
    info = {
        "api_url": api_url,
        "admin_token": token,
        "bin_dir": str(bin_dir),
        "ports": ports,
        "persistent": persistent,
        "started_at": time.time(),
        "k8s_version": K8S_VERSION,
    }
    state.write_info(info)
    cluster = state.cluster()
    assert cluster is not None
    api = cluster.api
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        return max(1.0, deadline - time.monotonic())

    def start(name: str, env: dict[str, str] | None = None) -> None:
        state.start(name, component_argv(name, bin_dir, state, ports), env)

    def check_alive(*names: str) -> bool:
        """Raises if a component died; returns False so it can lead an `or` chain."""
        for n in names:
            if state.pid_of(n) is None:
                tail = _tail(state.logs / f"{n}.log")
                raise DevClusterError(
                    f"{n} exited during startup (log: {state.logs / n}.log); last lines:\n{tail}"
                )
        return False

    try:
        start("etcd")
        etcd_url = f"http://127.0.0.1:{ports['etcd']}/health"
        wait_for(
            lambda: check_alive("etcd") or _http_ok(etcd_url), timeout=remaining(), what="etcd"
        )
        start("kube-apiserver")
        wait_for(
            lambda: check_alive("kube-apiserver") or _http_ok(f"{api_url}/readyz", token=token),
            timeout=remaining(),
            what="kube-apiserver /readyz",
            interval=0.1,
        )
        log(f"kube-apiserver ready after {time.monotonic() - t0:.1f}s")
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            start(name)
        ensure_nodes(cluster)
        _bootstrap_training_operator(api, bin_dir)
        start("training-operator", {"KUBECONFIG": str(state.kubeconfig)})
        _wait_ready(cluster, state, remaining, check_alive)
    except BaseException:
        _stop_all(state)
        state.info_file.unlink(missing_ok=True)
        raise
    info["ready_seconds"] = round(time.monotonic() - t0, 1)
    state.write_info(info)
    log(f"cluster ready in {info['ready_seconds']}s at {api_url}")
    return cluster


def ensure_nodes(cluster: Cluster) -> None:
    """Creates any missing inventory node (with status: allowed on create for nodes)."""
    api = cluster.api
    existing = {n["metadata"]["name"] for n in api.get("/api/v1/nodes")["items"]}
    for node in node_inventory():
        if node["metadata"]["name"] not in existing:
            api.create("/api/v1/nodes", node)


def _bootstrap_training_operator(api: Api, bin_dir: Path) -> None:
    """What the operator's Deployment would have in cluster: its namespace, the (empty) Secret its
    cert rotator fills, and the PyTorchJob CRD (server-side apply: it is too large for client-side
    apply's last-applied annotation). The ValidatingWebhookConfiguration is deliberately absent."""
    api.create("/api/v1/namespaces", {"metadata": {"name": "kubeflow"}})
    api.create(
        "/api/v1/namespaces/kubeflow/secrets",
        {"metadata": {"name": "training-operator-webhook-cert"}, "type": "Opaque"},
    )
    crd = (bin_dir / "kubeflow.org_pytorchjobs.yaml").read_bytes()
    api.request(
        "PATCH",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/pytorchjobs.kubeflow.org"
        "?fieldManager=devcluster&force=true",
        crd,
        content_type="application/apply-patch+yaml",
    )

    def established() -> bool:
        crd_obj = api.get(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/pytorchjobs.kubeflow.org"
        )
        conds = crd_obj.get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

    wait_for(established, timeout=30, what="PyTorchJob CRD Established")


def _wait_ready(
    cluster: Cluster,
    state: State,
    remaining: Callable[[], float],
    check_alive: Callable[..., bool],
) -> None:
    api = cluster.api
    names = {n["metadata"]["name"] for n in node_inventory()}

    def nodes_ready() -> bool:
        check_alive(*COMPONENTS)
        items = api.get("/api/v1/nodes")["items"]
        ready = {n["metadata"]["name"] for n in items if _node_ready_status(n) == "True"}
        return names <= ready

    wait_for(nodes_ready, timeout=remaining(), what="all nodes Ready (kwok)")
    # The ServiceAccount admission plugin rejects pods until the SA controller made `default`.
    wait_for(
        lambda: api.get_or_none("/api/v1/namespaces/default/serviceaccounts/default"),
        timeout=remaining(),
        what="default ServiceAccount (kube-controller-manager)",
    )
    for name, port_name in (
        ("kube-controller-manager", "controller-manager"),
        ("kube-scheduler", "scheduler"),
    ):
        url = f"https://127.0.0.1:{cluster.ports[port_name]}/healthz"
        wait_for(partial(_http_ok, url), timeout=remaining(), what=f"{name} /healthz")
    port = cluster.ports["training-operator-health"]
    wait_for(
        lambda: check_alive("training-operator") or _http_ok(f"http://127.0.0.1:{port}/readyz"),
        timeout=remaining(),
        what="training-operator /readyz (certs ready, controllers started)",
    )


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_all(state: State) -> None:
    for name in reversed(COMPONENTS):
        state.stop(name)


def down(state_dir: Path | None = None, *, force: bool = False) -> list[int]:
    """Stops every component (SIGTERM, then SIGKILL) and drops the etcd data; keeps logs/PKI.

    While pytest sessions still use the cluster (and not `force`), it is only handed over to
    them: the last one to finish stops it. Returns the PIDs of those sessions.
    """
    state = State(state_dir)
    if not state.root.exists():
        return []
    with state.lock():
        users = state.live_users()
        if users and not force:
            info = state.info()
            if info is not None:
                info["persistent"] = False
                state.write_info(info)
            return users
        _down_locked(state)
        return []


def _down_locked(state: State) -> None:
    _stop_all(state)
    shutil.rmtree(state.etcd_data, ignore_errors=True)
    state.info_file.unlink(missing_ok=True)


def status(state_dir: Path | None = None) -> dict[str, Any]:
    state = State(state_dir)
    info = state.info()
    out: dict[str, Any] = {
        "state_dir": str(state.root),
        "components": {c: state.pid_of(c) for c in COMPONENTS},
        "healthy": healthy(state),
    }
    if info:
        out.update(
            api_url=info["api_url"],
            ports=info["ports"],
            bin_dir=info["bin_dir"],
            persistent=info.get("persistent", False),
            kubeconfig=str(state.kubeconfig),
        )
        cluster = state.cluster()
        if cluster is not None and out["healthy"]:
            nodes = cluster.api.get("/api/v1/nodes")["items"]
            out["nodes"] = {n["metadata"]["name"]: _node_ready_status(n) for n in nodes}
    out["users"] = state.live_users()
    return out


def stop_component(name: str, state_dir: Path | None = None) -> None:
    """Stops one component of a running cluster by its PID (fault tests: an apiserver outage).
    The rest keeps running; `start_component` brings it back with the same flags and ports."""
    if name not in COMPONENTS:
        raise DevClusterError(f"unknown component {name!r}; one of {', '.join(COMPONENTS)}")
    State(state_dir).stop(name)


def start_component(name: str, state_dir: Path | None = None, *, timeout: float = 60) -> int:
    """Starts one stopped component again with the flags and ports in cluster.json and waits
    until it serves (the apiserver's /readyz, the training-operator's /readyz). Returns its PID."""
    state = State(state_dir)
    cluster = state.cluster()
    if cluster is None or name not in COMPONENTS:
        raise DevClusterError(f"no cluster in {state.root}, or unknown component {name!r}")
    if (pid := state.pid_of(name)) is not None:
        return pid
    env = {"KUBECONFIG": str(state.kubeconfig)} if name == "training-operator" else None
    pid = state.start(name, component_argv(name, cluster.bin_dir, state, cluster.ports), env)
    urls = {
        "kube-apiserver": (f"{cluster.api_url}/readyz", cluster.admin_token),
        "training-operator": (
            f"http://127.0.0.1:{cluster.ports['training-operator-health']}/readyz",
            None,
        ),
    }

    def serving() -> bool:
        if state.pid_of(name) is None:
            raise DevClusterError(f"{name} exited on restart; see {state.logs / name}.log")
        url, token = urls.get(name, ("", None))
        return not url or _http_ok(url, token=token)

    wait_for(serving, timeout=timeout, what=f"{name} serving again", interval=0.1)
    return pid


# ----------------------------------------------------------------------------- shared use (pytest)


@dataclass
class Lease:
    """One pytest session's use of the cluster; release() stops it if it was the last user of a
    cluster that pytest started (never a `devcluster.py up` one, never with keep=True)."""

    cluster: Cluster
    state: State
    keep: bool

    def release(self) -> None:
        with self.state.lock():
            (self.state.users / str(os.getpid())).unlink(missing_ok=True)
            info = self.state.info() or {}
            if self.keep or info.get("persistent") or self.state.live_users():
                return
            _down_locked(self.state)


def acquire(
    state_dir: Path | None = None, *, bin_dir: Path | None = None, keep: bool = False
) -> Lease:
    """Reuses a healthy cluster or starts one, and registers this process as a user."""
    state = State(state_dir)
    state.root.mkdir(parents=True, exist_ok=True)
    with state.lock():
        cluster = _up_locked(state, bin_dir, False, 180, lambda m: None)
        state.users.mkdir(parents=True, exist_ok=True)
        (state.users / str(os.getpid())).write_text(str(time.time()))
    return Lease(cluster=cluster, state=state, keep=keep)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devcluster.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="default: $CPT_CLUSTER_DIR or <repo>/.cluster"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start (or reuse) the cluster; prints the kubeconfig path")
    down_p = sub.add_parser("down", help="stop every component")
    down_p.add_argument(
        "--force", action="store_true", help="stop even while pytest sessions use the cluster"
    )
    sub.add_parser("status", help="components, health, nodes (JSON)")
    sub.add_parser("kubeconfig", help="print the admin kubeconfig path")
    args = parser.parse_args(argv)
    state = State(args.state_dir)

    def log(msg: str) -> None:
        print(f"devcluster: {msg}", file=sys.stderr)

    try:
        if args.cmd == "up":
            up(state.root, log=log)
            print(state.kubeconfig)
        elif args.cmd == "down":
            users = down(state.root, force=args.force)
            if users:
                log(
                    f"pytest sessions {users} still use the cluster: the last one to finish "
                    "stops it (`down --force` stops it now)"
                )
            else:
                log("stopped")
        elif args.cmd == "status":
            st = status(state.root)
            print(json.dumps(st, indent=2))
            return 0 if st["healthy"] else 1
        elif args.cmd == "kubeconfig":
            print(state.kubeconfig)
            if not state.kubeconfig.exists():
                log("no kubeconfig yet: run `make cluster-up` first")
                return 1
    except (DevClusterError, TimeoutError, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
