"""Goal 5: the operator at scale on the local control plane.

A control plane of its own (``hack/devcluster``, state in bench/work/cluster: no other test's
cluster is disturbed), the generated CRD, a loopback S3 server, and the operator as its image
runs it (``python -m cpt_operator``, through ``bench/operator_wrapper.py`` which only adds
request counters), watching one namespace.

1. Latency: ``--crs`` runs (default 200) are created at once (32 concurrent requests, their
   bodies encoded beforehand so this process spends next to no CPU in the burst). A watch on
   the namespace's Jobs and PyTorchJobs notes when each run's first child appears; latency =
   first child seen - the run's create request answered (one clock, this process).
2. Idle writes: once every run waits in a steady phase (its tokenize Job's pod cannot be
   scheduled: a node selector no node has), the operator's request counters are read before
   and after several resync periods. Reconciles are the operator's own count of its passes
   (``reconciles``; older operators: GETs of one run); writes are POST/PUT/PATCH/DELETE.
3. Memory: runs are added up to ``--idle-crs`` (default 1000); once all have children and a
   resync pass went by, the operator's resident set (VmRSS) and peak (VmHWM) are read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench import common
from bench.floor_operator import KeptAlive

NS = "cpt-bench"
API = "/apis/cpt.dev/v1alpha1"
CRD = common.REPO / "crds" / "cpt.dev_continualpretrains.yaml"
TEMPLATE = common.REPO / "tests" / "golden" / "specs" / "trn1-nxd.yaml"
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


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


def counts_diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    keys = set(before) | set(after)
    return {
        k: after.get(k, 0) - before.get(k, 0)
        for k in sorted(keys)
        if after.get(k, 0) != before.get(k, 0)
    }


def writes_and_reconciles(diff: dict[str, int]) -> tuple[int, int]:
    """(write requests, reconciles) in a counter diff (pure; unit-tested)."""
    writes = sum(v for k, v in diff.items() if k.split(" ", 1)[0] in WRITE_METHODS)
    reconciles = diff.get("reconciles", diff.get("GET run", 0))
    return writes, reconciles


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


def memory_map(pid: int) -> dict[str, Any]:
    """Where the resident set lives (/proc/<pid>/smaps): glibc's main heap, anonymous
    mappings (thread arenas, pymalloc arenas, mmap'd buffers), file-backed code and data;
    plus the thread count (each thread may own a glibc arena)."""
    groups: dict[str, int] = {}
    big_anon: list[int] = []
    current = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else ""
            current = (
                "heap"
                if name == "[heap]"
                else "anon"
                if not name
                else "stack"
                if name.startswith("[stack")
                else "file"
                if name.startswith("/")
                else "other"
            )
        elif head and head[0] == "Rss:":
            kib = int(head[1])
            groups[current] = groups.get(current, 0) + kib
            if current == "anon" and kib >= 4096:
                big_anon.append(kib)
    threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    return {
        "rssMiBBy": {k: round(v / 1024, 1) for k, v in sorted(groups.items())},
        "anonMappingsOver4MiB": sorted((round(k / 1024, 1) for k in big_anon), reverse=True),
        "threads": threads,
    }


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


def bench(
    crs: int,
    idle_crs: int,
    resync: float,
    idle_window: float,
    profile: Path | None = None,
    operator_env: dict[str, str] | None = None,
    apiserver_profile: Path | None = None,
    floor: bool = False,
    profile_seconds: int = 5,
    add_concurrency: int = 32,
) -> list[dict[str, Any]]:
    """The burst, the idle window and the memory reading against the operator; with `floor`,
    only the burst, against bench/floor_operator.py (the least any operator can do)."""
    common.bootstrap()
    sys.path.insert(0, str(common.REPO / "hack" / "devcluster"))
    import devcluster  # type: ignore[import-not-found]

    from bench.ckpt_sync_bench import Moto

    work = common.WORK / "operator"
    work.mkdir(parents=True, exist_ok=True)
    state = work / "cluster"
    t0 = time.perf_counter()
    if apiserver_profile is not None:
        os.environ["DEVCLUSTER_PROFILING"] = "1"
    cluster = devcluster.up(state, persistent=False, timeout=300)
    print(f"control plane up in {time.perf_counter() - t0:.0f}s", flush=True)
    moto = Moto(work / "moto.log")
    op: subprocess.Popen[bytes] | None = None
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        api = cluster.api
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            crd = api.get(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/continualpretrains.cpt.dev"
            )
            if any(
                c["type"] == "Established" and c["status"] == "True"
                for c in crd.get("status", {}).get("conditions") or []
            ):
                break
            time.sleep(0.5)
        api.create(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        )
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        boto3.client(
            "s3",
            **{
                "endpoint_url": moto.url,
                "aws_access_key_id": "testing",
                "aws_secret_access_key": "testing",
                "region_name": "us-east-1",
            },
        ).create_bucket(Bucket=bucket)
        counts_file = work / "counts.json"
        counts_file.unlink(missing_ok=True)
        env = {k: v for k, v in cluster.env().items() if not k.startswith(("AWS_", "CPT_"))}
        env.update(moto.env)
        env.update(
            {
                "CPT_WATCH_NAMESPACES": NS,
                "CPT_LIVENESS_ENDPOINT": "",
                "CPT_RESYNC_SECONDS": str(resync),
                "CPT_BENCH_COUNTS": str(counts_file),
                "PYTHONUNBUFFERED": "1",
                **({"CPT_BENCH_PROFILE": str(profile)} if profile else {}),
                **(operator_env or {}),
                "PYTHONPATH": os.pathsep.join(
                    [str(common.REPO), str(common.REPO / "operator"), str(common.REPO / "training")]
                ),
            }
        )
        if floor:
            env.update(
                {
                    "CPT_FLOOR_API": cluster.api_url,
                    "CPT_FLOOR_TOKEN": cluster.admin_token,
                    "CPT_FLOOR_CA": str(cluster.ca_file),
                    "CPT_FLOOR_NAMESPACE": NS,
                }
            )
        log = open(work / "operator.log", "wb")  # noqa: SIM115 - closed below
        op = subprocess.Popen(
            [sys.executable, "-m", "bench.floor_operator" if floor else "bench.operator_wrapper"],
            cwd=common.REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def counts() -> dict[str, int]:
            if floor:  # no request counters there
                return {}
            for _ in range(50):
                try:
                    data: dict[str, int] = json.loads(counts_file.read_text())["counts"]
                    return data
                except (OSError, ValueError, KeyError):
                    time.sleep(0.1)
            raise RuntimeError("the operator wrote no counters (see bench/work/operator)")

        # Ready: kopf has started its watches.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if floor and b"watching" in (work / "operator.log").read_bytes():
                break
            if not floor and counts_file.is_file() and any("(watch)" in k for k in counts()):
                break
            time.sleep(0.5)
        time.sleep(2)
        watcher = Watcher(api)
        time.sleep(1)

        created: dict[str, float] = {}

        client = KeptAlive(cluster.api_url, cluster.admin_token, api.ctx)

        # Every request body is encoded before the clock starts: parsing the template per run
        # cost this process 4 ms of CPU a run (0.8 CPU-s over a burst of 200, taken from the
        # two cores the API server and the operator share), which no real client adds there.
        bodies = {
            name: json.dumps(run_body(name, bucket)).encode()
            for name in (f"run-{i:04d}" for i in range(crs if floor else max(crs, idle_crs)))
        }

        def create(name: str) -> None:
            """POST on the thread's own kept-alive connection, as kubectl and client-go do (a
            new TLS handshake per request would cost the API server CPU no real client adds)."""
            status, text = client.request(
                "POST", f"{API}/namespaces/{NS}/continualpretrains", bodies[name]
            )
            if status != 201:
                raise RuntimeError(f"create {name}: HTTP {status}: {text[:300]!r}")
            created[name] = time.perf_counter()

        names = [f"run-{i:04d}" for i in range(crs)]
        print(f"creating {crs} runs at once ...", flush=True)
        # Every process on the two cores: the control plane's, the operator and this client.
        procs = {"operator": op.pid, "bench client": os.getpid()} | {
            f.stem: int(json.loads(f.read_text())["pid"])
            for f in sorted((state / "pids").glob("*.pid"))
        }
        cpu0 = {k: cpu_seconds(pid) for k, pid in procs.items()}
        c_burst0 = counts()
        pprof = None
        if apiserver_profile is not None:
            pprof = threading.Thread(
                target=lambda: apiserver_profile.write_bytes(
                    api.open(
                        "GET", f"/debug/pprof/profile?seconds={profile_seconds}", timeout=60
                    ).read()
                ),
                daemon=True,
            )
            pprof.start()
        t_burst = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(create, names))
        burst_seconds = time.perf_counter() - t_burst

        def wait_children(want: list[str], timeout: float) -> None:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                with watcher.lock:
                    if all(n in watcher.first for n in want):
                        return
                time.sleep(0.2)
            with watcher.lock:
                missing = [n for n in want if n not in watcher.first]
            raise RuntimeError(f"{len(missing)} runs got no child in {timeout}s: {missing[:5]}")

        wait_children(names, 600)
        burst_wall = time.perf_counter() - t_burst
        burst_cpu = {k: round(cpu_seconds(pid) - cpu0[k], 2) for k, pid in procs.items()}
        burst_requests = counts_diff(c_burst0, counts())
        api_profile: dict[str, Any] = {}
        if pprof is not None and apiserver_profile is not None:
            pprof.join()
            api_profile = apiserver_profile_summary(apiserver_profile, profile_seconds)
            print(f"API server profile: {api_profile}", flush=True)
        lat = [watcher.first[n] - created[n] for n in names]
        # The burst's shape: per 20 runs in answer order, when their creates were answered and
        # when their first children appeared (seconds from the burst's start).
        order = sorted(names, key=created.__getitem__)
        timeline = [
            {
                "runs": f"{i + 1}-{i + len(chunk)}",
                "createdBy": round(max(created[n] for n in chunk) - t_burst, 2),
                "childMedian": round(
                    common.percentile([watcher.first[n] - t_burst for n in chunk], 50), 2
                ),
                "latencyMedian": round(
                    common.percentile([watcher.first[n] - created[n] for n in chunk], 50), 2
                ),
            }
            for i in range(0, len(order), 20)
            for chunk in [order[i : i + 20]]
        ]
        print(f"timeline: {timeline}", flush=True)
        print(
            f"first child: p50 {common.percentile(lat, 50):.2f}s "
            f"p99 {common.percentile(lat, 99):.2f}s; create burst {burst_seconds:.1f}s; "
            f"CPU s {burst_cpu}; requests {burst_requests}",
            flush=True,
        )

        if floor:
            watcher.stop = True
            return floor_rows(lat, burst_seconds, burst_wall, timeline, burst_cpu, api_profile)

        def phases() -> dict[str, int]:
            items = api.get(f"{API}/namespaces/{NS}/continualpretrains")["items"]
            out: dict[str, int] = {}
            for it in items:
                ph = (it.get("status") or {}).get("phase") or "?"
                out[ph] = out.get(ph, 0) + 1
            return out

        # Idle: wait until nothing moves, then count requests over whole resync periods.
        time.sleep(2 * resync)
        ph = phases()
        c0 = counts()
        time.sleep(idle_window)
        c1 = counts()
        ph_after = phases()
        diff = counts_diff(c0, c1)
        writes, reconciles = writes_and_reconciles(diff)
        print(f"idle: {reconciles} reconciles, {writes} writes; phases {ph}", flush=True)
        rss_at_crs = rss_kib(op.pid)

        # Memory with many runs.
        more = [f"run-{i:04d}" for i in range(crs, idle_crs)]
        if more:
            print(f"adding {len(more)} runs ...", flush=True)
            with ThreadPoolExecutor(add_concurrency) as pool:
                list(pool.map(create, more))
            wait_children(names + more, 900)
            time.sleep(3 * resync)
        rss_many = rss_kib(op.pid)
        mem_map = memory_map(op.pid)
        print(f"memory map: {mem_map}", flush=True)
        total = len(names) + len(more)
        print(
            f"operator RSS with {total} runs: {rss_many['VmRSS'] / 1024:.0f} MiB "
            f"(peak {rss_many['VmHWM'] / 1024:.0f} MiB)",
            flush=True,
        )
        watcher.stop = True
    finally:
        if op is not None:
            op.terminate()
            try:
                op.wait(30)
            except subprocess.TimeoutExpired:
                op.kill()
        moto.stop()
        devcluster.down(state, force=True)
        shutil.rmtree(state / "etcd", ignore_errors=True)

    machine = machine_label()
    cfg = {
        "runs": crs,
        "createConcurrency": 32,
        "resyncSeconds": resync,
        "workerLimit": (operator_env or {}).get(
            "CPT_WORKER_LIMIT", "default (CPT_WORKER_LIMIT unset: 64, as the chart)"
        ),
        "operatorEnv": dict(operator_env or {}),
        "spec": "golden trn1-nxd, 1 tokenize shard, unschedulable tool pods",
        "apiserverProfiled": bool(api_profile),
    }
    return [
        common.measurement(
            "operator.first_child.p50",
            machine,
            cfg,
            "s",
            common.percentile(lat, 50),
            goal=common.goal("<=", 1.0),
            details={
                "p90": common.percentile(lat, 90),
                "max": max(lat),
                "createBurstSeconds": burst_seconds,
                "latencies": sorted(lat),
                "untilAllChildrenSeconds": burst_wall,
                "timeline": timeline,
                "cpuSecondsDuringBurst": burst_cpu,
                **({"apiserverProfile": api_profile} if api_profile else {}),
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
            goal=common.goal("<=", 5.0),
        ),
        common.measurement(
            "operator.idle.writes_per_reconcile",
            machine,
            {**cfg, "idleWindowSeconds": idle_window},
            "writes/reconcile",
            writes / reconciles if reconciles else float("nan"),
            goal=common.goal("<=", 0.0),
            details={
                "writes": writes,
                "reconciles": reconciles,
                "requests": diff,
                "phasesBefore": ph,
                "phasesAfter": ph_after,
            },
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
                "memoryMap": mem_map,
                "rssMiBAt": {
                    str(crs): rss_at_crs["VmRSS"] / 1024,
                    str(total): rss_many["VmRSS"] / 1024,
                },
            },
        ),
    ]


def floor_rows(
    lat: list[float],
    burst_seconds: float,
    burst_wall: float,
    timeline: list[dict[str, Any]],
    burst_cpu: dict[str, float],
    api_profile: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The floor's burst (no goal: the yardstick for the operator's own rows)."""
    machine = machine_label()
    cfg = {
        "runs": len(lat),
        "createConcurrency": 32,
        "operator": "bench/floor_operator.py: watch runs, build and create the first child, "
        "nothing else",
        "spec": "golden trn1-nxd, 1 tokenize shard, unschedulable tool pods",
        "apiserverProfiled": bool(api_profile),
    }
    details = {
        "p90": common.percentile(lat, 90),
        "max": max(lat),
        "createBurstSeconds": burst_seconds,
        "untilAllChildrenSeconds": burst_wall,
        "timeline": timeline,
        "cpuSecondsDuringBurst": burst_cpu,
        "loadAvg": common.load_average(),
        **({"apiserverProfile": api_profile} if api_profile else {}),
    }
    return [
        common.measurement(
            "operator.floor.first_child.p50",
            machine,
            cfg,
            "s",
            common.percentile(lat, 50),
            details=details,
        ),
        common.measurement(
            "operator.floor.first_child.p99", machine, cfg, "s", common.percentile(lat, 99)
        ),
    ]


# What the API server's CPU went to, by the first rule whose frame is on a sample's stack (in
# this order: a status write of a custom resource also passes through generic handlers).
APISERVER_WORK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Go garbage collector (background)", ("runtime.gcBgMarkWorker", "runtime.bgsweep")),
    (
        "custom resources: creates (runs, PyTorchJobs)",
        ("crdHandler).serveResource.CreateResource",),
    ),
    ("custom resources: status writes", ("crdHandler).serveStatus",)),
    (
        "custom resources: other writes",
        (
            "crdHandler).serveResource.UpdateResource",
            "crdHandler).serveResource.PatchResource",
            "crdHandler).serveResource.DeleteResource",
        ),
    ),
    ("pods: status writes (scheduler, kubelets)", ("registry/core/pod/storage.(*StatusREST)",)),
    ("pods: bindings", ("registry/core/pod/storage.(*BindingREST)",)),
    ("built-in creates (pods, services, Events, ...)", ("handlers.CreateResource",)),
    ("built-in updates and patches", ("handlers.PatchResource", "handlers.UpdateResource")),
    ("watches: sending events", ("handlers.(*WatchServer)",)),
    ("watches: etcd stream and watch cache", ("etcd3.(*watchChan)", "storage/cacher.")),
    ("reads (GET, LIST)", ("handlers.GetResource", "handlers.ListResource")),
    # Go keeps 64 frames of a stack: deep write paths lose their handler frame.
    ("writes, handler cut from the stack (managed fields)", ("managedfields", "structured-merge")),
    ("handler chain (routing, authn/z, metrics)", ("DefaultBuildHandlerChain",)),
    ("HTTP/2 and TLS", ("golang.org/x/net/http2", "crypto/tls", "net/http.")),
    ("etcd client (gRPC)", ("google.golang.org/grpc", "go.etcd.io/etcd/client")),
)
OTHER_WORK = "other (in-process controllers, runtime)"


def classify_traces(text: str) -> dict[str, float]:
    """CPU seconds by kind of work from `go tool pprof -traces` output (pure; unit-tested)."""
    out: dict[str, float] = {}
    for block in text.split("-----------+")[1:]:
        lines = [ln for ln in block.splitlines()[1:] if ln.strip()]
        if not lines:
            continue
        head = lines[0].split()
        m = re.fullmatch(r"([0-9.]+)(ns|us|µs|ms|s)", head[0]) if head else None
        if m is None:
            continue
        seconds = float(m[1]) * {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}[m[2]]
        frames = [head[1] if len(head) > 1 else "", *(ln.strip() for ln in lines[1:])]
        kind = next(
            (
                name
                for name, marks in APISERVER_WORK
                if any(mark in f for f in frames for mark in marks)
            ),
            OTHER_WORK,
        )
        out[kind] = out.get(kind, 0.0) + seconds
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def apiserver_profile_summary(path: Path, seconds: int) -> dict[str, Any]:
    """The API server's Go CPU profile of the burst, by kind of work."""
    go = shutil.which("go")
    if go is None:
        return {"error": "no go toolchain to read the profile"}
    text = subprocess.run(
        [go, "tool", "pprof", "-traces", str(path)], capture_output=True, text=True, check=True
    ).stdout
    work = classify_traces(text)
    return {
        "windowSeconds": seconds,
        "cpuSeconds": round(sum(work.values()), 2),
        "byWork": work,
    }


def profile_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """The operator's profile: functions by own time, and our code / the HTTP client by
    cumulative time (what a reconcile costs and where)."""
    import pstats

    st = pstats.Stats(str(path))
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({func})",
                "path": file,
                "calls": nc,
                "ownSeconds": tt,
                "cumulativeSeconds": ct,
            }
        )
    own = sorted(rows, key=lambda r: -r["ownSeconds"])[:top]
    ours = sorted(
        (
            r
            for r in rows
            if "cpt_operator" in r["path"] or "httpcore2" in r["path"] or "lightkube" in r["path"]
        ),
        key=lambda r: -r["cumulativeSeconds"],
    )[:top]
    for r in own + ours:
        r.pop("path", None)
    return {
        "totalSeconds": st.total_tt,  # type: ignore[attr-defined]
        "byOwnTime": own,
        "oursAndHttpByCumulative": ours,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crs", type=int, default=200)
    p.add_argument("--idle-crs", type=int, default=1000, help="runs for the memory reading")
    p.add_argument("--resync", type=float, default=10.0, help="CPT_RESYNC_SECONDS (default 10)")
    p.add_argument("--idle-window", type=float, default=30.0)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--profile", type=Path, help="cProfile the operator into this file")
    p.add_argument(
        "--apiserver-profile",
        type=Path,
        help="the API server's Go CPU profile of the burst's first seconds (go tool pprof); "
        "its summary by kind of work goes into the results",
    )
    p.add_argument("--apiserver-profile-seconds", type=int, default=5)
    p.add_argument(
        "--add-concurrency",
        type=int,
        default=32,
        help="concurrent creates when adding the runs for the memory reading",
    )
    p.add_argument(
        "--operator-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra operator environment (tuning, e.g. CPT_WORKER_LIMIT=16); recorded",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="the burst only, against bench/floor_operator.py instead of the operator "
        "(results: operator-floor.json)",
    )
    args = p.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.operator_env)
    items = bench(
        args.crs,
        max(args.idle_crs, args.crs),
        args.resync,
        args.idle_window,
        args.profile,
        extra,
        args.apiserver_profile,
        args.floor,
        args.apiserver_profile_seconds,
        args.add_concurrency,
    )
    for m in items:
        print(f"{m['name']:40s} {m['value']:.3f} {m['metric']}")
    if args.profile:
        # A profiled operator runs slower: its numbers go to their own file, with the profile.
        lat = items[0]
        reqs = lat["details"]["requestsDuringBurst"]
        prof = common.measurement(
            "operator.profile.run_reads_per_run",
            lat["machine"],
            {**lat["config"], "profiled": True},
            "GET run per run (burst)",
            reqs.get("GET run", 0) / args.crs,
            details={
                "latencyUnderProfile": {k: lat["details"][k] for k in ("p90", "max")}
                | {"p50": lat["value"]},
                "requestsDuringBurst": reqs,
                "cpuSecondsDuringBurst": lat["details"]["cpuSecondsDuringBurst"],
                "profile": profile_summary(args.profile),
            },
        )
        if not args.no_write:
            print("wrote", common.write_results("operator-profile", [prof]))
        return 0
    if not args.no_write:
        print("wrote", common.write_results("operator-floor" if args.floor else "operator", items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
