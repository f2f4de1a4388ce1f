"""The floor for goal 5's first-child latency: the least any operator can do per new run.

It watches ContinualPretrains in one namespace and, for each new one, builds the run's first
child with cpt's own builders (the preflight PyTorchJob of the golden spec) and creates it.
Nothing else: no admission checks, no dry runs, no status, no Events, no index, no children
watch, no retries. `bench/operator_bench.py --floor` runs it in place of the operator, on the
same control plane and the same burst, so the difference between the two is what cpt's
bookkeeping costs, and the floor itself is what the two cores allow. Not a product: it would
create children for a run whose spec the real operator rejects.

Environment: CPT_FLOOR_API (API server URL), CPT_FLOOR_TOKEN, CPT_FLOOR_CA (CA file),
CPT_FLOOR_NAMESPACE; CPT_FLOOR_CONCURRENCY creates in flight (default 16, the operator's
CPT_API_CONCURRENCY).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import ssl
import sys
import threading
import time
import urllib.parse
from typing import Any

from cpt_operator.api.models import ContinualPretrainSpec
from cpt_operator.builders import pytorchjob, stages
from cpt_operator.reconcile.decide import RunMeta

API = "/apis/cpt.dev/v1alpha1"


class KeptAlive:
    """Requests on one kept-alive HTTPS connection per thread, as client-go keeps them (the
    benchmark's own creates use it too)."""

    def __init__(self, url: str, token: str, ctx: ssl.SSLContext) -> None:
        self.u = urllib.parse.urlsplit(url)
        self.token = token
        self.ctx = ctx
        self.local = threading.local()

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(
                self.u.hostname or "127.0.0.1", self.u.port, context=self.ctx, timeout=60
            )
            self.local.conn = conn
        conn.request(
            method,
            path,
            body=body if body is None or isinstance(body, bytes) else json.dumps(body),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        return resp.status, resp.read()


def first_child(run: dict[str, Any]) -> dict[str, Any]:
    """The run's first child exactly as the operator builds it (decide.py's preflight)."""
    spec = ContinualPretrainSpec.model_validate(run.get("spec") or {})
    meta = RunMeta.of(run)
    cfg = stages.preflight_stage(spec, meta.name, meta.namespace)
    return pytorchjob.preflight_job(spec, meta.ref, cfg)


def main() -> int:
    url, token, ns = (
        os.environ[k] for k in ("CPT_FLOOR_API", "CPT_FLOOR_TOKEN", "CPT_FLOOR_NAMESPACE")
    )
    ctx = ssl.create_default_context(cafile=os.environ["CPT_FLOOR_CA"])
    api = KeptAlive(url, token, ctx)
    todo: queue.Queue[dict[str, Any]] = queue.Queue()
    seen: set[str] = set()
    build_seconds = [0.0]
    lock = threading.Lock()

    def creator() -> None:
        while True:
            run = todo.get()
            t0 = time.process_time()
            child = first_child(run)
            with lock:
                build_seconds[0] += time.process_time() - t0
            status, text = api.request(
                "POST", f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs", child
            )
            if status not in (201, 409):
                print(f"create for {run['metadata']['name']}: HTTP {status}: {text[:200]!r}")

    for _ in range(int(os.environ.get("CPT_FLOOR_CONCURRENCY", "16"))):
        threading.Thread(target=creator, daemon=True).start()
    u = urllib.parse.urlsplit(url)
    print("floor operator watching", flush=True)
    while True:
        try:
            conn = http.client.HTTPSConnection(
                u.hostname or "127.0.0.1", u.port, context=ctx, timeout=660
            )
            conn.request(
                "GET",
                f"{API}/namespaces/{ns}/continualpretrains?watch=1&timeoutSeconds=600",
                headers={"Authorization": f"Bearer {token}"},
            )
            resp = conn.getresponse()
            for line in resp:
                ev = json.loads(line)
                obj = ev.get("object") or {}
                name = (obj.get("metadata") or {}).get("name")
                if ev.get("type") == "ADDED" and name and name not in seen:
                    seen.add(name)
                    todo.put(obj)
        except Exception as exc:  # the API server ends watches now and then: reconnect
            print(f"watch ended: {exc!r}", flush=True)
            time.sleep(0.2)
        finally:
            print(f"runs seen {len(seen)}, build CPU {build_seconds[0]:.2f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
