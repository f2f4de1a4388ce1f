"""kopf glue: which run to pass over, and when (cpt_operator/passes.py does the pass).

* `run_event` (kopf's watch of the runs) reconciles the run from the event's body, skips the
  echo of our own status patch, and forgets a deleted run;
* `child_event` (the operator's own watches of labelled Jobs/PyTorchJobs/Pods,
  cpt_operator/k8s/watch.py) updates the child index and schedules one settled pass;
* `startup` loads the planner's tables, primes the child index and the runs' S3 roots, then
  starts the resync loop and the children's watches; `cleanup` stops them and gives pending
  records a few seconds;
* the liveness probe fails when the resync loop or a children's watch stopped.

No finalizer is used on purpose (kopf adds one for `@kopf.timer`/daemons, which is why the
resync is a plain task): children go with the run through ownerReferences, S3 data stays, and
deleting a run never hangs because the operator is down.

Run with `kopf run -m cpt_operator.handlers --standalone -A` or `python -m cpt_operator`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import kopf
from lightkube import ApiError

from cpt_operator import passes
from cpt_operator.api import planner
from cpt_operator.api.models import GROUP, PLURAL, VERSION
from cpt_operator.index import ALL_NAMESPACES
from cpt_operator.k8s import watch
from cpt_operator.k8s.client import CHILD_KINDS, LIST_PAGE, Kube, KubeApi
from cpt_operator.reconcile import conditions

log = logging.getLogger("cpt_operator")

ANNOTATION_PREFIX = "cpt.dev"
FINALIZER = "cpt.dev/finalizer"  # declared for kopf; no handler of ours requires it


def _env_level(name: str, default: int) -> int:
    """A logging level named in the environment (the chart's operator.postingLevel)."""
    level = logging.getLevelName(os.environ.get(name, "").upper())
    return level if isinstance(level, int) else default


class EventOnlyDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf builds a "diff essence" (a deep copy of the body, then a second copy) for every
    watch event, for change-detecting handlers (on.create/update/resume). cpt registers only
    event handlers, so nothing reads it: measured, the copies were a fifth of the operator's CPU
    in a burst of new runs. `change_handlers()` guards the assumption (checked at startup and
    by a unit test)."""

    def build(
        self,
        *,
        body: kopf.Body,
        extra_fields: Iterable[Any] | None = None,
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()


def change_handlers(registry: kopf.OperatorRegistry | None = None) -> list[str]:
    """Ids of registered change-detecting handlers (which would need kopf's diff essence)."""
    reg = registry or kopf.get_default_registry()
    return [str(h.id) for h in reg._changing.get_all_handlers()]


def configure(settings: kopf.OperatorSettings) -> None:
    """Watch/request timeouts against silently stalled watches (kopf #698, #204), our own
    annotation prefix, and Kubernetes events only for kopf warnings (ours are explicit).
    CPT_POSTING_LEVEL and CPT_WORKER_LIMIT come from the chart (operator.postingLevel,
    operator.workerLimit)."""
    settings.posting.level = _env_level("CPT_POSTING_LEVEL", logging.WARNING)
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 5
    # Each watch restart re-lists every run: in pages, not one answer of all of them (the
    # heap a whole answer takes at its peak stays in the resident set).
    settings.watching.chunk_size = LIST_PAGE
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 5
    # Workers wait on the API (capped in the client) only until a run's children exist; its
    # Events and status patch are written by a task (passes.reconcile_locked). Measured, 200
    # runs at once: 64 workers p99 2.5 s; writing them in the worker, 128 workers p99 6-7 s.
    settings.queueing.worker_limit = int(os.environ.get("CPT_WORKER_LIMIT", "64"))
    # kopf keeps an object's worker alive this long after its last event (default 5 s), and
    # an idle worker still holds one of the worker_limit slots: under a burst of new runs the
    # 129th waited ~5 s for a slot (measured). Our handlers never need the worker kept warm.
    settings.queueing.idle_timeout = float(os.environ.get("CPT_WORKER_IDLE_SECONDS", "0.2"))
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    if change_handlers():
        raise RuntimeError(f"change handlers need kopf's diff essence: {change_handlers()}")
    settings.persistence.diffbase_storage = EventOnlyDiffBase(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )


# -- the reconcile (testable with any KubeApi) -------------------------------------------------


def watched_scopes() -> tuple[str, ...]:
    """The namespaces `python -m cpt_operator` watches (CPT_WATCH_NAMESPACES), else all."""
    names = [n for n in os.environ.get("CPT_WATCH_NAMESPACES", "").split(",") if n]
    return tuple(names) or (ALL_NAMESPACES,)


# -- kopf handlers -----------------------------------------------------------------------------


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure(settings)
    planner.warm()  # not on the first new run's pass, with the event loop blocked
    passes.STATE.kube = passes.STATE.kube or Kube()
    passes.STATE.scopes = watched_scopes()
    try:  # before the watches start: their first events then land on a primed index
        await passes.verify_index(passes.STATE.kube, passes.STATE.index, passes.STATE.scopes)
    except ApiError as err:  # e.g. no RBAC to list cluster-wide: each run LISTs its own
        log.warning("could not list the runs' children (each run lists its own): %s", err)
    await passes.prime_roots(passes.STATE.kube, passes.STATE.scopes)
    passes.STATE.last_resync = time.monotonic()
    passes.STATE.resync_task = asyncio.create_task(passes.resync_forever(passes.RESYNC_SECONDS))
    passes.STATE.watches = start_child_watches(passes.STATE.kube, passes.STATE.scopes)


def start_child_watches(kube: KubeApi, scopes: tuple[str, ...]) -> list[asyncio.Task[None]]:
    """One watch per child kind and scope, labels selected by the API server."""
    if not isinstance(kube, Kube):  # tests of the glue feed child_event themselves
        return []

    async def verify() -> None:  # a watch restarted from now: deletions in between
        await passes.verify_index(kube, passes.STATE.index, passes.STATE.scopes)

    return [
        asyncio.create_task(
            watch.follow(
                kube,
                kind,
                None if scope == ALL_NAMESPACES else scope,
                child_event,
                on_restart=verify,
            ),
            name=f"watch {kind[1]} in {scope}",
        )
        for kind in CHILD_KINDS
        for scope in scopes
    ]


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if passes.STATE.resync_task is not None:
        passes.STATE.resync_task.cancel()
    for task in passes.STATE.watches:
        task.cancel()
    for task in list(passes.STATE.tasks):
        task.cancel()
    passes.STATE.new_run_at = float("-inf")  # held records go now
    passes.STATE.new_passes = 0
    if passes.STATE.records:  # written statuses spare the next start repeating passes and Events
        _done, pending = await asyncio.wait(
            set(passes.STATE.records), timeout=passes.RECORD_GRACE_SECONDS
        )
        for task in pending:
            task.cancel()
    if isinstance(passes.STATE.kube, Kube):
        await passes.STATE.kube.close()
    passes.STATE.kube = None


@kopf.on.probe(id="resyncAgeSeconds")
def resync_probe(**_: Any) -> float:
    """Liveness fails when the resync loop died or stalled."""
    age = time.monotonic() - passes.STATE.last_resync
    task = passes.STATE.resync_task
    if task is None or task.done() or age > 6 * passes.RESYNC_SECONDS + 60:
        raise RuntimeError(f"the resync loop is not running (last pass {age:.0f}s ago)")
    if stopped := [t.get_name() for t in passes.STATE.watches if t.done()]:
        raise RuntimeError(f"stopped: {', '.join(stopped)}")
    return round(age, 1)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def run_event(
    type: str, namespace: str | None, name: str, body: Mapping[str, Any] | None = None, **_: Any
) -> None:
    if namespace is None:
        return
    key = (namespace, name)
    if type == "DELETED":
        passes.forget_run(key)
        return
    if body:
        passes.remember_roots(body)
    passes.STATE.runs.setdefault(key, "")
    current = passes.run_event_body(key, body)
    if current is passes.SKIP:
        return
    decision = await passes.reconcile_locked(namespace, name, current)
    if decision is not None and decision.status.get("phase") == "Failed":
        reasons = [c for c in decision.status.get("conditions", []) if c.get("type") == "Failed"]
        if reasons and reasons[0].get("reason") == conditions.INVALID_SPEC:
            raise kopf.PermanentError(f"invalid spec: {reasons[0].get('message')}")


def child_event(type: str | None, body: Mapping[str, Any]) -> None:
    """A child's watch event (cpt_operator/k8s/watch.py): into the index; a reconcile only
    when the run is known and the child changed in a way the decision reads (our own create's
    ADDED event, for one, changes nothing)."""
    key = passes.STATE.index.apply(type, body)
    if (
        key is not None
        and key in passes.STATE.runs
        and passes.STATE.runs[key] not in passes.TERMINAL
    ):
        passes.schedule_reconcile(key, passes.CHILD_SETTLE_SECONDS)
