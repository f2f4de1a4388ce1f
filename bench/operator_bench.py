"""Goal 5 as a guard: the operator at scale on the local control plane.

A control plane of its own (``hack/devcluster``, state in bench/work/operator/cluster: no other
test's cluster is disturbed), the generated CRD, a loopback S3 server, and the operator as its
image runs it (``python -m cpt_operator``), watching one namespace. The operator is not
instrumented: writes are the API server's own request counters (``/metrics``), reconciles
the operator's ``passes`` liveness probe (kopf's ``/healthz``).

1. One run on the idle cluster: from its create request answered to its first child seen on a
   watch (one clock, this process). Goal: at most 1 s.
2. A burst: ``--crs`` runs (default 200) created at once (32 concurrent requests, bodies
   encoded beforehand). Goal: every run has its first child, p99 at most 10 s.
3. Idle writes: once every run waits in a steady phase (its pods cannot be scheduled: a node
   selector no node has), the requests that write runs, their children or Events over whole
   resync periods, per reconcile. Goal: 0.
4. Memory: runs are added up to ``--idle-crs`` (default 1000); once all have children and
   resync passes went by, the operator's resident set. Goal: at most 150 MiB.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench import common

NS = "cpt-bench"
API = "/apis/cpt.dev/v1alpha1"
CRD = common.REPO / "crds" / "cpt.dev_continualpretrains.yaml"
TEMPLATE = common.REPO / "tests" / "golden" / "specs" / "trn1-nxd.yaml"
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")
# What the operator writes: its runs' status, their children, Events. Other components write
# these too (the scheduler posts Events about unschedulable pods), so Events are counted by
# listing the runs' own.
WRITTEN_RESOURCES = ("continualpretrains", "jobs", "pytorchjobs", "pods")
REQUEST_LINE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def run_body(name: str, bucket: str) -> dict[str, Any]:
    """A trn1 NxD run (the golden spec) with storage in ``bucket``, no Secret references, one
    tokenize shard, and tool pods no node can take (so the run waits, steadily)."""
    body = yaml.safe_load(TEMPLATE.read_text())
    body["metadata"] = {"name": name, "namespace": NS}
    spec = body["spec"]
    spec["model"]["source"] = f"s3://{bucket}/models/base/"
    spec["data"]["sources"] = [{"uri": f"s3://{bucket}/corpus/", "format": "jsonl"}]
    spec["data"]["shards"] = 1
    spec["checkpoints"]["s3Uri"] = f"s3://{bucket}/runs/{name}/"
    spec["output"]["s3Uri"] = f"s3://{bucket}/models/{name}/"
    rt = spec.setdefault("runtime", {})
    for absent in (
        "hfTokenSecretRef",
        "s3CredentialsSecretRef",
        "neuronCompileCacheUri",
        "priorityClassName",
        "serviceAccountName",
    ):
        rt.pop(absent, None)
    rt["toolsNodeSelector"] = {"bench.cpt.dev/no-such-node": "true"}
    spec.setdefault("resiliency", {})["pendingTimeoutSeconds"] = 0
    out: dict[str, Any] = body
    return out


def machine_label() -> str:
    return common.cpu_machine() + ", local control plane (devcluster) on loopback"


def request_counts(metrics: str) -> dict[str, int]:
    """Requests so far by verb and resource (``POST jobs``, ``PATCH continualpretrains/status``),
    from the API server's ``apiserver_request_total`` (pure; unit-tested)."""
    out: dict[str, int] = {}
    for line in metrics.splitlines():
        m = REQUEST_LINE.match(line)
        if m is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        sub = labels.get("subresource")
        key = f"{labels.get('verb')} {labels.get('resource')}" + (f"/{sub}" if sub else "")
        if labels.get("dry_run"):
            key += " (dry run)"
        out[key] = out.get(key, 0) + int(float(m.group("value")))
    return out


def write_requests(counts: dict[str, int]) -> int:
    """Writes of the operator's resources among `request_counts` (Events are counted apart:
    other components post them too)."""
    return sum(
        v
        for k, v in counts.items()
        if k.split(" ")[0] in WRITE_VERBS and k.split(" ")[1].split("/")[0] in WRITTEN_RESOURCES
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


class Watcher:
    """First-seen time of each run's first child (Jobs and PyTorchJobs in the namespace)."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.first: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = False
        self.threads = [
            threading.Thread(target=self._watch, args=(p,), daemon=True)
            for p in (
                f"/apis/batch/v1/namespaces/{NS}/jobs",
                f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs",
            )
        ]
        for t in self.threads:
            t.start()

    def _watch(self, path: str) -> None:
        while not self.stop:
            try:
                resp = self.api.open(
                    "GET",
                    f"{path}?watch=1&labelSelector=cpt.dev%2Frun&timeoutSeconds=600",
                    timeout=660,
                )
                with resp:
                    for line in resp:
                        now = time.perf_counter()
                        ev = json.loads(line)
                        run = (
                            (ev.get("object") or {}).get("metadata", {}).get("labels") or {}
                        ).get("cpt.dev/run")
                        if run and ev.get("type") == "ADDED":
                            with self.lock:
                                self.first.setdefault(run, now)
                        if self.stop:
                            return
            except Exception:  # reconnect (the apiserver ends watches now and then)
                time.sleep(0.2)


class KeptAlive:
    """Requests on one kept-alive HTTPS connection per thread, as client-go keeps them (a TLS
    handshake per create would cost the API server CPU no real client adds to a burst)."""

    def __init__(self, url: str, token: str, ctx: ssl.SSLContext) -> None:
        self.u = urllib.parse.urlsplit(url)
        self.token = token
        self.ctx = ctx
        self.local = threading.local()

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            host = self.u.hostname or "127.0.0.1"
            conn = http.client.HTTPSConnection(host, self.u.port, context=self.ctx, timeout=60)
            self.local.conn = conn
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Operator:
    """``python -m cpt_operator`` as the image runs it, its liveness endpoint on loopback."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        env = {**env, "CPT_LIVENESS_ENDPOINT": f"http://127.0.0.1:{self.port}/healthz"}
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cpt_operator"],
            cwd=common.REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def probes(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/healthz"
        with urllib.request.urlopen(url, timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                self.probes()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("the operator did not start (bench/work/operator/operator.log)")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def bench(
    crs: int, idle_crs: int, resync: float, idle_window: float, workers: int | None = None
) -> list[dict[str, Any]]:
    common.bootstrap()
    sys.path.insert(0, str(common.REPO / "hack" / "devcluster"))
    import boto3
    import devcluster  # type: ignore[import-not-found]

    from bench.ckpt_sync_bench import Moto

    work = common.WORK / "operator"
    work.mkdir(parents=True, exist_ok=True)
    state = work / "cluster"
    t0 = time.perf_counter()
    cluster = devcluster.up(state, persistent=False, timeout=300)
    print(f"control plane up in {time.perf_counter() - t0:.0f}s", flush=True)
    moto = Moto(work / "moto.log")
    op: Operator | None = None
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/continualpretrains.cpt.dev"
        )
        api = cluster.api
        api.create(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        )
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        s3 = boto3.client(
            "s3",
            endpoint_url=moto.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket=bucket)
        env = {k: v for k, v in cluster.env().items() if not k.startswith(("AWS_", "CPT_"))}
        env.update(moto.env)
        env.update(
            {"CPT_WATCH_NAMESPACES": NS, "CPT_RESYNC_SECONDS": str(resync), "PYTHONUNBUFFERED": "1"}
        )
        if workers is not None:
            env["CPT_WORKER_LIMIT"] = str(workers)
        op = Operator(env, work / "operator.log")
        op.wait_ready()
        time.sleep(2)  # kopf's watches started
        watcher = Watcher(api)
        time.sleep(1)
        bodies = {
            name: json.dumps(run_body(name, bucket)).encode()
            for name in ["single", *(f"run-{i:04d}" for i in range(max(crs, idle_crs)))]
        }
        created: dict[str, float] = {}

        client = KeptAlive(cluster.api_url, cluster.admin_token, api.ctx)

        def counts() -> dict[str, int]:
            return request_counts(api.open("GET", "/metrics", timeout=60).read().decode())

        def create(name: str) -> None:
            status, text = client.post(f"{API}/namespaces/{NS}/continualpretrains", bodies[name])
            if status != 201:
                raise RuntimeError(f"create {name}: HTTP {status}: {text[:300]!r}")
            created[name] = time.perf_counter()

        def wait_children(want: list[str], timeout: float) -> None:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                with watcher.lock:
                    if all(n in watcher.first for n in want):
                        return
                time.sleep(0.05)
            missing = [n for n in want if n not in watcher.first]
            raise RuntimeError(f"{len(missing)} runs got no child in {timeout}s: {missing[:5]}")

        create("single")
        wait_children(["single"], 60)
        single = watcher.first["single"] - created["single"]
        print(f"one run on an idle cluster: first child after {single:.2f}s", flush=True)
        time.sleep(2 * resync)

        names = [f"run-{i:04d}" for i in range(crs)]
        print(f"creating {crs} runs at once ...", flush=True)
        procs = {"operator": op.proc.pid} | {
            f.stem: int(json.loads(f.read_text())["pid"])
            for f in sorted((state / "pids").glob("*.pid"))
        }
        cpu0 = {k: cpu_seconds(pid) for k, pid in procs.items()}
        req0 = counts()
        t_burst = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(create, names))
        wait_children(names, 600)
        burst_wall = time.perf_counter() - t_burst
        burst_cpu = {k: round(cpu_seconds(pid) - cpu0[k], 2) for k, pid in procs.items()}
        req1 = counts()
        burst_requests = {k: v - req0.get(k, 0) for k, v in req1.items() if v > req0.get(k, 0)}
        lat = [watcher.first[n] - created[n] for n in names]
        print(
            f"first child: p50 {common.percentile(lat, 50):.2f}s "
            f"p99 {common.percentile(lat, 99):.2f}s; CPU s {burst_cpu}",
            flush=True,
        )

        def writes() -> int:
            events = api.get(
                f"/api/v1/namespaces/{NS}/events"
                "?fieldSelector=involvedObject.kind=ContinualPretrain"
            )["items"]
            return write_requests(counts()) + sum(int(e.get("count") or 1) for e in events)

        def phases() -> dict[str, int]:
            out: dict[str, int] = {}
            for it in api.get(f"{API}/namespaces/{NS}/continualpretrains")["items"]:
                ph = (it.get("status") or {}).get("phase") or "?"
                out[ph] = out.get(ph, 0) + 1
            return out

        time.sleep(2 * resync)  # nothing moves any more
        ph = phases()
        w0, p0 = writes(), int(op.probes()["passes"])
        time.sleep(idle_window)
        w1, p1 = writes(), int(op.probes()["passes"])
        idle_writes, reconciles = w1 - w0, p1 - p0
        print(f"idle: {reconciles} reconciles, {idle_writes} writes; phases {ph}", flush=True)
        rss_at_crs = rss_kib(op.proc.pid)

        more = [f"run-{i:04d}" for i in range(crs, idle_crs)]
        if more:
            print(f"adding {len(more)} runs ...", flush=True)
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(create, more))
            wait_children(names + more, 1200)
            time.sleep(3 * resync)
        rss_many = rss_kib(op.proc.pid)
        total = 1 + len(names) + len(more)
        print(
            f"operator RSS with {total} runs: {rss_many['VmRSS'] / 1024:.0f} MiB "
            f"(peak {rss_many['VmHWM'] / 1024:.0f} MiB)",
            flush=True,
        )
        watcher.stop = True
    finally:
        if op is not None:
            op.stop()
        moto.stop()
        devcluster.down(state, force=True)
        shutil.rmtree(state / "etcd", ignore_errors=True)

    machine = machine_label()
    cfg = {
        "runs": crs,
        "createConcurrency": 32,
        "resyncSeconds": resync,
        "workerLimit": workers or "default (32, as the chart)",
        "spec": "golden trn1-nxd, 1 tokenize shard, unschedulable pods",
    }
    return [
        common.measurement(
            "operator.first_child.single",
            machine,
            {**cfg, "runs": 1},
            "s",
            single,
            goal=common.goal("<=", 1.0),
        ),
        common.measurement(
            "operator.first_child.p50",
            machine,
            cfg,
            "s",
            common.percentile(lat, 50),
            details={
                "p90": common.percentile(lat, 90),
                "max": max(lat),
                "latencies": sorted(lat),
                "untilAllChildrenSeconds": burst_wall,
                "cpuSecondsDuringBurst": burst_cpu,
                "requestsDuringBurst": burst_requests,
                "loadAvg": common.load_average(),
            },
        ),
        common.measurement(
            "operator.first_child.p99",
            machine,
            cfg,
            "s",
            common.percentile(lat, 99),
            goal=common.goal("<=", 10.0),
        ),
        common.measurement(
            "operator.idle.writes_per_reconcile",
            machine,
            {**cfg, "idleWindowSeconds": idle_window},
            "writes/reconcile",
            idle_writes / reconciles if reconciles else float("nan"),
            goal=common.goal("<=", 0.0),
            details={"writes": idle_writes, "reconciles": reconciles, "phases": ph},
        ),
        common.measurement(
            "operator.rss",
            machine,
            {**cfg, "runs": total},
            "MiB",
            rss_many["VmRSS"] / 1024,
            goal=common.goal("<=", 150.0),
            details={
                "peakMiB": rss_many["VmHWM"] / 1024,
                "rssMiBAt": {
                    str(crs + 1): rss_at_crs["VmRSS"] / 1024,
                    str(total): rss_many["VmRSS"] / 1024,
                },
            },
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crs", type=int, default=200, help="runs created at once")
    ap.add_argument("--idle-crs", type=int, default=1000, help="runs for the memory reading")
    ap.add_argument("--resync", type=float, default=10.0, help="CPT_RESYNC_SECONDS")
    ap.add_argument("--idle-window", type=float, default=30.0, help="seconds counted idle")
    ap.add_argument("--workers", type=int, help="CPT_WORKER_LIMIT (default: the chart's)")
    ap.add_argument("--no-write", action="store_true", help="print, write no results file")
    args = ap.parse_args(argv)
    items = bench(
        args.crs, max(args.idle_crs, args.crs), args.resync, args.idle_window, args.workers
    )
    for m in items:
        print(f"{m['name']:40s} {m['value']:.3f} {m['metric']}")
    if not args.no_write:
        print("wrote", common.write_results("operator", items))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
