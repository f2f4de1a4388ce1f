"""kopf glue: read → observe → decide → apply → patch status if it changed.

Level-based: every reconcile recomputes the whole decision from what exists now, so it does
not matter which event woke it up, how many were missed, or whether the operator restarted in
between. Two triggers feed it:

* `@kopf.on.event` on runs and on the run's Jobs/PyTorchJobs (label `cpt.dev/run`): fast
  reaction to phase changes of children;
* a resync loop (every `CPT_RESYNC_SECONDS`, default 10 s) over the non-terminal runs kopf has
  seen: time-based rules (pending/hang/node timeouts) and progress.json refresh.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from lightkube import ApiError
from pydantic import ValidationError

from cpt_operator.api.models import (
    GROUP,
    PLURAL,
    TERMINAL_PHASES,
    VERSION,
    ContinualPretrainSpec,
    Phase,
)
from cpt_operator.builders import stages
from cpt_operator.builders.meta import RUN_LABEL
from cpt_operator.k8s.client import Kube, KubeApi
from cpt_operator.progress import StorageView, read_storage_async
from cpt_operator.reconcile import admission, conditions
from cpt_operator.reconcile.actions import CreateChild, DeleteChild, EmitEvent
from cpt_operator.reconcile.admission import Blocker
from cpt_operator.reconcile.decide import Decision, RunMeta, decide, dump_status, load_status
from cpt_operator.reconcile.observe import Observed, observe
from cpt_operator.reconcile.patch import merge_patch

log = logging.getLogger("cpt_operator")

RESYNC_SECONDS = float(os.environ.get("CPT_RESYNC_SECONDS", "10"))
STORAGE_CACHE_SECONDS = 5.0
ANNOTATION_PREFIX = "cpt.dev"
FINALIZER = "cpt.dev/finalizer"  # declared for kopf; no handler of ours requires it
TERMINAL = {p.value for p in TERMINAL_PHASES}
# Phases whose decision uses S3 (progress.json, committed checkpoints).
STORAGE_PHASES = {"Tokenizing", "PreparingWeights", "Training", "Suspended", "Converting"}


@dataclass
class OperatorState:
    """Process-wide state: the client, runs seen (for the resync) and per-run locks."""

    kube: KubeApi | None = None
    runs: dict[tuple[str, str], str] = field(default_factory=dict)
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    storage: dict[tuple[str, str], tuple[float, StorageView]] = field(default_factory=dict)
    last_resync: float = field(default_factory=time.monotonic)
    resync_task: asyncio.Task[None] | None = None


STATE = OperatorState()


def _env_level(name: str, default: int) -> int:
    """A logging level named in the environment (the chart's operator.postingLevel)."""
    level = logging.getLevelName(os.environ.get(name, "").upper())
    return level if isinstance(level, int) else default


def configure(settings: kopf.OperatorSettings) -> None:
    """Watch/request timeouts against silently stalled watches (kopf #698, #204), our own
    annotation prefix, and Kubernetes events only for kopf warnings (ours are explicit).
    CPT_POSTING_LEVEL and CPT_WORKER_LIMIT come from the chart (operator.postingLevel,
    operator.workerLimit)."""
    settings.posting.level = _env_level("CPT_POSTING_LEVEL", logging.WARNING)
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 5
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 5
    settings.queueing.worker_limit = int(os.environ.get("CPT_WORKER_LIMIT", "32"))
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )


# -- the reconcile (testable with any KubeApi) -------------------------------------------------


async def read_storage(body: Mapping[str, Any], *, use_cache: bool = True) -> StorageView:
    """S3 view of a run, cached for a few seconds: child events come in bursts."""
    meta = body.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    hit = STATE.storage.get(key)
    if use_cache and hit is not None and time.monotonic() - hit[0] < STORAGE_CACHE_SECONDS:
        return hit[1]
    try:
        spec = ContinualPretrainSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return StorageView()
    p = stages.paths(spec, key[1], key[0])
    view = await read_storage_async(p.checkpoints, p.progress)
    STATE.storage[key] = (time.monotonic(), view)
    return view


PLANNING_PHASES = {None, "", "Pending", "Planning"}


async def admission_blockers(kube: KubeApi, body: Mapping[str, Any]) -> tuple[Blocker, ...]:
    """Facts a run must pass before its first child exists (reconcile/admission.py): the
    Secrets it references exist, the namespace's Pod Security level admits its pods, and the
    API server accepts its pod templates (server-side dry run). Unknown facts (no RBAC to
    read them) block nothing."""
    if (body.get("status") or {}).get("phase") not in PLANNING_PHASES:
        return ()
    try:
        spec = ContinualPretrainSpec.model_validate(body.get("spec") or {})
        run = RunMeta.of(body)
        manifests = admission.dry_run_manifests(spec, run.ref)
    except ValueError:  # an invalid spec fails in planning with its own message
        return ()
    ns = run.namespace
    found: list[Blocker] = []
    for field_, secret in admission.secret_refs(spec):
        if await kube.secret_exists(ns, secret) is False:
            found.append(admission.missing_secret(field_, secret, ns))
    found += admission.pod_security_problems(spec, await kube.pod_security_level(ns))
    for what, field_, manifest in manifests:
        if message := await kube.dry_run_create(manifest, ns):
            found.append(admission.rejected(what, field_, message))
    return tuple(found)


async def observe_run(kube: KubeApi, body: Mapping[str, Any]) -> Observed:
    meta = body.get("metadata") or {}
    namespace, name = str(meta["namespace"]), str(meta["name"])
    jobs, ptjs, pods = await kube.list_children(namespace, name)
    node_names = [
        str(p["spec"]["nodeName"])
        for p in pods
        if (p.get("spec") or {}).get("nodeName")
        and (p.get("metadata", {}).get("labels") or {}).get("cpt.dev/stage") == "train"
    ]
    nodes = await kube.get_nodes(node_names) if node_names else []
    view = StorageView()
    phase = (body.get("status") or {}).get("phase")
    if phase in STORAGE_PHASES:
        # Cached only while training (event bursts); a phase that can finish the run reads
        # fresh so the final status names the final checkpoint.
        # Between attempts (no training child recorded) the next attempt's resume point is
        # decided from this read: never from a cached view older than the newest commit.
        training_child = ((body.get("status") or {}).get("children") or {}).get("train")
        view = await read_storage(body, use_cache=phase == "Training" and bool(training_child))
    return observe(
        jobs=jobs,
        pytorchjobs=ptjs,
        pods=pods,
        nodes=nodes,
        progress=view.progress,
        checkpoint=view.checkpoint,
        storage_error=view.error,
        blockers=await admission_blockers(kube, body),
    )


async def reject_run(
    kube: KubeApi, body: Mapping[str, Any], action: CreateChild, message: str
) -> None:
    """The API server refused a child built from the spec (a runtime field it validates
    and the planning-time dry run did not see, e.g. changed mid-run): Failed, saying why."""
    old = body.get("status") or {}
    status = load_status(old)
    now = datetime.now(UTC).replace(microsecond=0)
    generation = (body.get("metadata") or {}).get("generation")
    msg = f"the API server rejects {action.kind} {action.name} built from this spec: {message}"
    marks: tuple[tuple[str, conditions.Status], ...] = (("Failed", "True"), ("Succeeded", "False"))
    for type_, value in marks:
        conditions.set_condition(
            status, type_, value, conditions.INVALID_SPEC, msg, now=now, generation=generation
        )
    was = status.phase.value
    status.phase, status.message = Phase.FAILED, f"{conditions.INVALID_SPEC}: {msg}"
    status.completion_time = now
    await kube.post_event(body, "Warning", conditions.INVALID_SPEC, f"{was} → Failed: {msg}")
    patch = merge_patch(old, dump_status(status))
    if patch:
        await kube.patch_status(
            str(body["metadata"]["namespace"]), str(body["metadata"]["name"]), patch
        )


async def apply(kube: KubeApi, body: Mapping[str, Any], decision: Decision) -> None:
    """Actions first, then the status: a crash in between is repaired by the next reconcile
    (see reconcile/decide.py)."""
    meta = body.get("metadata") or {}
    namespace, name = str(meta["namespace"]), str(meta["name"])
    for action in decision.actions:
        if isinstance(action, CreateChild):
            try:
                created = await kube.create(action.manifest, namespace)
            except ApiError as err:
                if err.status.code not in (400, 422):
                    raise
                # Invalid, and retrying cannot change that: fail the run, do not loop.
                await reject_run(kube, body, action, str(err.status.message or err))
                return
            log.info(
                "%s/%s: %s %s %s",
                namespace,
                name,
                "created" if created else "found",
                action.kind,
                action.name,
            )
        elif isinstance(action, DeleteChild):
            await kube.delete(
                action.api_version,
                action.kind,
                action.name,
                namespace,
                propagation=action.propagation,
                grace_period=action.grace_period,
            )
            log.info("%s/%s: deleted %s %s", namespace, name, action.kind, action.name)
        elif isinstance(action, EmitEvent):
            await kube.post_event(body, action.type, action.reason, action.message)
    patch = merge_patch(body.get("status") or {}, decision.status) if decision.changed else {}
    if patch:
        await kube.patch_status(namespace, name, patch)


async def reconcile(
    kube: KubeApi, namespace: str, name: str, *, now: datetime | None = None
) -> Decision | None:
    """One level-based pass over a run. None when there is nothing to do (gone, being
    deleted, or finished): terminal phases are sticky and cost no reads of children."""
    body = await kube.get_run(namespace, name)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return None
    status = body.get("status") or {}
    if status.get("phase") in TERMINAL:
        STATE.runs[(namespace, name)] = str(status["phase"])
        return None
    observed = await observe_run(kube, body)
    decision = decide(
        RunMeta.of(body), body.get("spec") or {}, status, observed, now or datetime.now(UTC)
    )
    await apply(kube, body, decision)
    STATE.runs[(namespace, name)] = str(decision.status.get("phase", ""))
    return decision


async def reconcile_locked(namespace: str, name: str) -> Decision | None:
    """Serialises reconciles of one run (events and the resync may race)."""
    if STATE.kube is None:
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    lock = STATE.locks.setdefault((namespace, name), asyncio.Lock())
    async with lock:
        try:
            return await reconcile(STATE.kube, namespace, name)
        except ApiError as err:
            raise kopf.TemporaryError(f"API error: {err}", delay=5) from err


async def resync_forever(interval: float) -> None:
    while True:
        for (namespace, name), phase in sorted(STATE.runs.items()):
            if phase in TERMINAL:
                continue
            try:
                await reconcile_locked(namespace, name)
            except Exception as err:  # one broken run must not stop the others
                log.warning("resync of %s/%s failed: %s", namespace, name, err)
        STATE.last_resync = time.monotonic()
        await asyncio.sleep(interval)


# -- kopf handlers -----------------------------------------------------------------------------


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure(settings)
    STATE.kube = STATE.kube or Kube()
    STATE.last_resync = time.monotonic()
    STATE.resync_task = asyncio.create_task(resync_forever(RESYNC_SECONDS))


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if STATE.resync_task is not None:
        STATE.resync_task.cancel()
    if isinstance(STATE.kube, Kube):
        await STATE.kube.close()
    STATE.kube = None


@kopf.on.probe(id="resyncAgeSeconds")
def resync_probe(**_: Any) -> float:
    """Liveness fails when the resync loop died or stalled."""
    age = time.monotonic() - STATE.last_resync
    task = STATE.resync_task
    if task is None or task.done() or age > 6 * RESYNC_SECONDS + 60:
        raise RuntimeError(f"the resync loop is not running (last pass {age:.0f}s ago)")
    return round(age, 1)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def run_event(type: str, namespace: str | None, name: str, **_: Any) -> None:
    if namespace is None:
        return
    key = (namespace, name)
    if type == "DELETED":
        STATE.runs.pop(key, None)
        STATE.locks.pop(key, None)
        STATE.storage.pop(key, None)
        return
    STATE.runs.setdefault(key, "")
    decision = await reconcile_locked(namespace, name)
    if decision is not None and decision.status.get("phase") == "Failed":
        reasons = [c for c in decision.status.get("conditions", []) if c.get("type") == "Failed"]
        if reasons and reasons[0].get("reason") == conditions.INVALID_SPEC:
            raise kopf.PermanentError(f"invalid spec: {reasons[0].get('message')}")


@kopf.on.event("batch", "v1", "jobs", labels={RUN_LABEL: kopf.PRESENT})
@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels={RUN_LABEL: kopf.PRESENT})
async def child_event(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    run = labels.get(RUN_LABEL)
    if namespace and run and (namespace, run) in STATE.runs:
        await reconcile_locked(namespace, run)
