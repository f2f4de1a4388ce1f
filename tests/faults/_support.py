"""Shared pieces of the fault matrix: a private control plane, a fault-injecting S3 proxy and
small helpers for driving KWOK nodes and checking that nothing is lost.

Why a private cluster: the fault cases make nodes NotReady, fill every trn1 node and restart
the kube-apiserver. On the shared dev cluster that would evict or stall the pods of other
pytest sessions, so the matrix runs on its own control plane (`<state>/faults`, same binaries,
its own ports), started once per session and stopped at the end.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from e2e.harness import OperatorProcess, Runs, spec_body

from fixtures.cluster import Cluster, devcluster
from fixtures.s3 import S3Server

FAULTS_STATE = "faults"
TOOLS_GATE = "test.cpt.dev/tools-gate"
"""toolsNodeSelector label: tool Job pods stay Pending until a cpu node carries it (`gate`)."""


def private_cluster() -> Iterator[Cluster]:
    """A control plane of our own (see the module docstring), torn down when the last user
    of it (this session) ends."""
    bin_dir = devcluster.find_bin_dir(build=True)
    state_dir = devcluster.default_state_dir() / FAULTS_STATE
    # Random ports only: the shared cluster prefers fixed ones, and two clusters starting at
    # the same moment could both find one free and race for it.
    preferred = dict(devcluster.PREFERRED_PORTS)
    devcluster.PREFERRED_PORTS.update({k: 0 for k in preferred})
    try:
        lease = devcluster.acquire(state_dir, bin_dir=bin_dir)
    finally:
        devcluster.PREFERRED_PORTS.update(preferred)
    try:
        yield lease.cluster
    finally:
        lease.release()


# ---------------------------------------------------------------------------------- runs


def fault_spec(name: str, bucket: str, **changes: Any) -> dict[str, Any]:
    """The seed-shaped trn1 run (2 nodes, TP 8 x PP 4) with short resiliency timeouts and
    tool Jobs behind the gate. `changes` as in harness.spec_body (`a__b=value`)."""
    resiliency = {
        "maxAttempts": 3,
        "pendingTimeoutSeconds": 0,
        "hangTimeoutSeconds": 0,
        "nodeNotReadySeconds": 4,
        "preflight": {"enabled": False},
    }
    resiliency.update(changes.pop("resiliency", {}))
    gated = changes.pop("gated", False)
    tools = {"cpt.dev/pool": "cpu", **({TOOLS_GATE: "open"} if gated else {})}
    changes.setdefault("training__maxSteps", 40)
    changes.setdefault("checkpoints__everySteps", 10)
    return spec_body(
        name, bucket, resiliency=resiliency, runtime__toolsNodeSelector=tools, **changes
    )


def gate(cluster: Cluster, open_: bool, node: str = "cpu-0") -> None:
    """Opens (labels `node`) or closes the gate for tool Job pods."""
    cluster.api.patch(
        f"/api/v1/nodes/{node}", {"metadata": {"labels": {TOOLS_GATE: "open" if open_ else None}}}
    )


def stays(
    predicate: Callable[[], Any], *, seconds: float, what: str, interval: float = 0.3
) -> None:
    """Asserts that `predicate` holds on every poll for `seconds` (a negative property: the
    operator must NOT do something during several of its resync periods)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"stopped holding: {what}"
        time.sleep(interval)


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in status.get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    raise AssertionError(f"no condition {type_} in {status.get('conditions')}")


def uids(items: list[dict[str, Any]]) -> dict[str, str]:
    return {o["metadata"]["name"]: o["metadata"]["uid"] for o in items}


def wait_attempt(runs: Runs, run: str, attempt: int, *, timeout: float = 90) -> dict[str, Any]:
    """Waits until the run records `attempt` with its PyTorchJob created."""
    return runs.wait(
        run,
        lambda s: (
            s.get("attempt") == attempt
            and (s.get("children") or {}).get("train") == f"{run}-train-{attempt}"
        ),
        timeout=timeout,
        what=f"{run} attempt {attempt} started",
    )


def occupy_nodes(cluster: Cluster, namespace: str, nodes: list[str]) -> list[str]:
    """Fills `nodes` (trn1) with placeholder pods that take every Neuron device, so a run's
    pods cannot be placed there. Returns the placeholder pod names."""
    names = []
    for node in nodes:
        name = f"placeholder-{node}"
        cluster.api.create(
            f"/api/v1/namespaces/{namespace}/pods",
            {
                "metadata": {"name": name, "labels": {"app": "placeholder"}},
                "spec": {
                    "nodeName": node,
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [
                        {
                            "name": "hold",
                            "image": "placeholder",
                            "resources": {
                                "requests": {"aws.amazon.com/neuron": "16"},
                                "limits": {"aws.amazon.com/neuron": "16"},
                            },
                        }
                    ],
                },
            },
        )
        names.append(name)
    return names


# ---------------------------------------------------------------------------------- S3 proxy


_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message>'
    "<RequestId>cpt-fault-proxy</RequestId></Error>"
)


@dataclass
class Seen:
    """One request the proxy answered."""

    at: float
    method: str
    path: str
    status: int


@dataclass
class S3FaultProxy:
    """An HTTP proxy on loopback in front of the S3 server that injects what a bad day of S3
    looks like: 503 SlowDown / 500 InternalError for the next N requests or for every request
    (an outage), and stalled requests (held until released, then dropped) to kill a client at
    an exact point of an upload. Point AWS_ENDPOINT_URL at `url`."""

    upstream: str
    seen: list[Seen] = field(default_factory=list)
    fail_next: int = 0
    fail_code: int = 503
    down: bool = False
    stall_re: re.Pattern[str] | None = None
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    access_keys: set[str] = field(default_factory=set)
    """Access key ids that signed requests (SigV4 `Credential=`; never the secret key)."""

    def __post_init__(self) -> None:
        host, _, port = self.upstream.removeprefix("http://").rstrip("/").partition(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                out = bytearray()
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    out += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)

            def answer(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
                self.send_response(status)
                length = str(len(body))
                for k, v in headers:
                    if k.lower() == "content-length" and self.command == "HEAD":
                        length = v  # a HEAD answer has no body but the object's length
                    elif k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def handle_any(self) -> None:
                body = self.read_body()
                signed = re.search(r"Credential=([^/,\s]+)/", self.headers.get("Authorization", ""))
                if signed:
                    with proxy.lock:
                        proxy.access_keys.add(signed.group(1))
                verdict = proxy._verdict(f"{self.command} {self.path}")
                if verdict == "stall":
                    proxy.stalled.set()
                    proxy.release.wait(120)
                    proxy._record(self.command, self.path, 0)
                    self.close_connection = True  # dropped: the client never gets an answer
                    return
                if isinstance(verdict, int):
                    code = "SlowDown" if verdict == 503 else "InternalError"
                    xml = _ERROR_XML.format(code=code, msg="injected by the fault proxy")
                    proxy._record(self.command, self.path, verdict)
                    self.answer(verdict, xml.encode(), [("Content-Type", "application/xml")])
                    return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"
                }
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                proxy._record(self.command, self.path, resp.status)
                self.answer(resp.status, data, resp.getheaders())

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _verdict(self, request: str) -> int | str | None:
        with self.lock:
            if self.stall_re is not None and self.stall_re.search(request):
                return "stall"
            if self.down:
                return self.fail_code
            if self.fail_next > 0:
                self.fail_next -= 1
                return self.fail_code
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.seen.append(Seen(time.monotonic(), method, path, status))

    def requests(self, pattern: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if re.search(pattern, f"{s.method} {s.path}")]

    def server_env(self, s3: S3Server) -> S3Server:
        """The S3 server's settings with the endpoint replaced by this proxy."""
        return S3Server(endpoint_url=self.url, log_path=s3.log_path)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------- reports


def operator_log(op: OperatorProcess) -> str:
    try:
        return Path(op.log_path).read_text(errors="replace")
    except OSError:
        return ""


__all__ = [
    "S3FaultProxy",
    "condition",
    "fault_spec",
    "gate",
    "occupy_nodes",
    "operator_log",
    "private_cluster",
    "stays",
    "uids",
    "wait_attempt",
]
