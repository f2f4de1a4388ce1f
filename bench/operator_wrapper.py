"""Run the operator (``python -m cpt_operator``) with request counters, for goal 5.

Every Kubernetes API request the process makes is counted by method and by what it touched,
at the two HTTP clients it uses: kopf's (aiohttp: watches, its own patches and events) and
ours (lightkube's httpx2 client, over aiohttp by default: reads, child creation, status
patches; counted once, at httpx2). The counters are written
as JSON to ``$CPT_BENCH_COUNTS`` twice a second, so the benchmark can diff them around an idle
window. Besides requests, ``reconciles`` counts the operator's reconcile passes (its own
counter: a reconcile no longer always starts with a GET of the run). Nothing else changes: the
handlers, settings and environment are the image's.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

COUNTS: collections.Counter[str] = collections.Counter()
_LOCK = threading.Lock()
_RUN_PATH = re.compile(r"/continualpretrains/[^/?]+(/status)?(\?|$)")


def classify(method: str, url: str) -> str:
    """``METHOD kind`` for a request URL (pure; unit-tested)."""
    path = url.split("://", 1)[-1]
    path = path[path.find("/") :] if "/" in path else "/"
    watch = "watch=" in path and ("watch=true" in path or "watch=1" in path)
    if "/continualpretrains" in path:
        kind = "run" if _RUN_PATH.search(path) else "runs"
        if path.split("?")[0].endswith("/status"):
            kind = "run/status"
    elif "/jobs" in path:
        kind = "jobs"
    elif "/pytorchjobs" in path:
        kind = "pytorchjobs"
    elif "/events" in path:
        kind = "events"
    elif "/pods" in path:
        kind = "pods"
    elif "/nodes" in path:
        kind = "nodes"
    else:
        kind = "other"
    return f"{method.upper()} {kind}{' (watch)' if watch else ''}"


def _count(method: str, url: str) -> None:
    key = classify(method, url)
    with _LOCK:
        COUNTS[key] += 1


def install() -> None:
    import aiohttp
    import httpx2

    from cpt_operator.k8s import transport

    ours: weakref.WeakSet[Any] = weakref.WeakSet()  # our transport's sessions: counted at httpx
    orig_session = transport.AiohttpTransport._session_now

    def _session_now(self: Any) -> Any:
        session = orig_session(self)
        ours.add(session)
        return session

    transport.AiohttpTransport._session_now = _session_now  # type: ignore[method-assign]
    orig_request = aiohttp.ClientSession._request

    async def _request(self: Any, method: str, str_or_url: Any, *a: Any, **k: Any) -> Any:
        if self not in ours:
            _count(method, str(str_or_url))
        return await orig_request(self, method, str_or_url, *a, **k)

    aiohttp.ClientSession._request = _request  # type: ignore[method-assign]

    orig_send = httpx2.AsyncClient.send

    async def send(self: Any, request: Any, *a: Any, **k: Any) -> Any:
        _count(str(request.method), str(request.url))
        return await orig_send(self, request, *a, **k)

    httpx2.AsyncClient.send = send  # type: ignore[method-assign]

    from cpt_operator.k8s import watch

    orig_parse = watch.parse

    def parse(line: str | bytes, kind: tuple[str, str]) -> tuple[str, dict[str, Any]]:
        type_, obj = orig_parse(line, kind)
        with _LOCK:  # what the children's watches bring in, and how many bytes
            COUNTS[f"child {kind[1]} {type_}"] += 1
            COUNTS[f"child {kind[1]} bytes"] += len(line)
        return type_, obj

    watch.parse = parse


def _time_gc() -> None:
    """Counts the cyclic garbage collector's passes and milliseconds per generation
    (``gc genN``, ``gc genN ms``): under a burst, its full passes over every live object are
    CPU the operator spends that no profile of its own functions names."""
    import gc

    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        gen = info.get("generation", 0)
        ms = round((time.perf_counter() - started[0]) * 1000)
        with _LOCK:
            COUNTS[f"gc gen{gen}"] += 1
            COUNTS[f"gc gen{gen} ms"] += ms

    gc.callbacks.append(callback)


def _dump_forever(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    while True:
        with _LOCK:
            snap = dict(COUNTS)
        state = getattr(sys.modules.get("cpt_operator.passes"), "STATE", None)
        if state is not None:  # None while the module is still being imported
            snap["reconciles"] = int(state.reconciles)
        tmp.write_text(json.dumps({"t": time.time(), "counts": snap}))
        tmp.replace(path)
        time.sleep(0.5)


def _describe(obj: object) -> str:
    if isinstance(obj, dict):
        keys = sorted(map(str, obj))[:6]
        return f"dict{keys}"
    if isinstance(obj, list | tuple):
        return f"{type(obj).__name__}[{len(obj)}]"
    if type(obj).__name__ == "frame":
        code = obj.f_code  # type: ignore[attr-defined]
        return f"frame {code.co_filename.rsplit('/', 2)[-2:]}:{code.co_name}"
    if type(obj).__name__ == "cell":
        return "cell"
    return type(obj).__module__ + "." + type(obj).__qualname__


def _dump_body_referrers(path: Path) -> None:
    """Counts the live Kubernetes object bodies (dicts with apiVersion, kind, metadata, spec)
    by kind and, for a sample of each kind, the chains of objects that refer to them."""
    import gc

    gc.collect()
    bodies = [
        o
        for o in gc.get_objects()
        if isinstance(o, dict) and {"apiVersion", "kind", "metadata", "spec"} <= o.keys()
    ]
    by_kind = collections.Counter(str(b.get("kind")) for b in bodies)
    chains: dict[str, collections.Counter[str]] = {}
    ignore = {id(bodies)}
    for kind in by_kind:
        sample = [b for b in bodies if b.get("kind") == kind][:20]
        counter: collections.Counter[str] = collections.Counter()
        for b in sample:
            for r1 in gc.get_referrers(b):
                if id(r1) in ignore or r1 is sample:
                    continue
                parents = [_describe(r2) for r2 in gc.get_referrers(r1)[:3] if id(r2) not in ignore]
                counter[_describe(r1) + " <- " + " | ".join(parents)] += 1
        chains[kind] = counter
    path.write_text(
        json.dumps(
            {"bodies": by_kind, "referrers": {k: c.most_common(8) for k, c in chains.items()}},
            indent=1,
        )
    )


def _every(seconds: float, fn: Callable[[], object]) -> None:
    """Calls ``fn`` every ``seconds`` from a daemon thread, for the process's life."""

    def loop() -> None:
        while True:
            time.sleep(seconds)
            fn()

    threading.Thread(target=loop, daemon=True).start()


def main() -> None:
    install()
    _time_gc()
    prof_path = os.environ.get("CPT_BENCH_PROFILE")
    if prof_path:  # where the operator's CPU goes (dumped when it exits on SIGTERM)
        import atexit
        import cProfile

        # The event loop's own CPU time, not wall time: in a burst on two cores the loop
        # waits for a core often, and a wall-clock profile would charge that to whatever ran.
        prof = cProfile.Profile(time.thread_time)
        prof.enable()

        def dump() -> None:
            prof.disable()
            prof.dump_stats(prof_path)

        atexit.register(dump)
    trace_path = os.environ.get("CPT_BENCH_TRACEMALLOC")
    if trace_path:  # what the operator's memory is (a snapshot dumped when it exits)
        import atexit
        import tracemalloc

        tracemalloc.start(8)
        atexit.register(lambda: tracemalloc.take_snapshot().dump(trace_path))
    peak_path = os.environ.get("CPT_BENCH_TRACEMALLOC_PEAK")
    if peak_path:  # what the traced memory is at its highest (a snapshot at each new high)
        import tracemalloc

        tracemalloc.start(12)
        best = [0]

        def at_new_high() -> None:
            current, _ = tracemalloc.get_traced_memory()
            if current > max(best[0] * 1.1, 32 << 20):
                best[0] = current
                tracemalloc.take_snapshot().dump(peak_path)
                print(f"tracemalloc peak snapshot at {current >> 20} MiB", flush=True)

        _every(0.25, at_new_high)
    referrers_path = os.environ.get("CPT_BENCH_REFERRERS")
    if referrers_path:  # who keeps whole object bodies alive (written when the operator exits)
        import atexit

        atexit.register(_dump_body_referrers, Path(referrers_path))
    if os.environ.get("CPT_BENCH_MALLOCSTATS"):  # pymalloc's arenas, used and free, at exit
        import atexit

        def mallocstats() -> None:
            status = Path("/proc/self/status").read_text()
            print(*(ln for ln in status.splitlines() if ln.startswith("Vm")), sep="\n")
            sys.stdout.flush()
            sys._debugmallocstats()

        atexit.register(mallocstats)
    gc_every = float(os.environ.get("CPT_BENCH_GC_SECONDS", "0"))
    if gc_every > 0:  # experiment: is cyclic garbage part of the resident set?
        import gc

        _every(gc_every, gc.collect)
    trim_every = float(os.environ.get("CPT_BENCH_TRIM_SECONDS", "0"))
    if trim_every > 0:  # experiment: is freed-but-kept C heap part of the resident set?
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _every(trim_every, lambda: libc.malloc_trim(0))
    out = os.environ.get("CPT_BENCH_COUNTS")
    if out:
        threading.Thread(target=_dump_forever, args=(Path(out),), daemon=True).start()
    from cpt_operator.__main__ import main as operator_main

    operator_main()


if __name__ == "__main__":
    main()
