"""Run the operator (``python -m cpt_operator``) with request counters, for goal 5.

Every Kubernetes API request the process makes is counted by method and by what it touched,
at the two HTTP clients it uses: kopf's (aiohttp: watches, its own patches and events) and
ours (lightkube over httpx2: reads, child creation, status patches). The counters are written
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

    orig_request = aiohttp.ClientSession._request

    async def _request(self: Any, method: str, str_or_url: Any, *a: Any, **k: Any) -> Any:
        _count(method, str(str_or_url))
        return await orig_request(self, method, str_or_url, *a, **k)

    aiohttp.ClientSession._request = _request  # type: ignore[method-assign]

    orig_send = httpx2.AsyncClient.send

    async def send(self: Any, request: Any, *a: Any, **k: Any) -> Any:
        _count(str(request.method), str(request.url))
        return await orig_send(self, request, *a, **k)

    httpx2.AsyncClient.send = send  # type: ignore[method-assign]


def _dump_forever(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    while True:
        with _LOCK:
            snap = dict(COUNTS)
        state = getattr(sys.modules.get("cpt_operator.handlers"), "STATE", None)
        if state is not None:  # None while the module is still being imported
            snap["reconciles"] = int(state.reconciles)
        tmp.write_text(json.dumps({"t": time.time(), "counts": snap}))
        tmp.replace(path)
        time.sleep(0.5)


def main() -> None:
    install()
    prof_path = os.environ.get("CPT_BENCH_PROFILE")
    if prof_path:  # where the operator's CPU goes (dumped when it exits on SIGTERM)
        import atexit
        import cProfile

        prof = cProfile.Profile()
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
    out = os.environ.get("CPT_BENCH_COUNTS")
    if out:
        threading.Thread(target=_dump_forever, args=(Path(out),), daemon=True).start()
    from cpt_operator.__main__ import main as operator_main

    operator_main()


if __name__ == "__main__":
    main()
