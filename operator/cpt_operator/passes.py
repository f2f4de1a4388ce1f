"""One reconcile pass of a run, and the state the passes share: read → observe → decide →
apply → record the status if it changed. kopf's handlers (cpt_operator/handlers.py) and the
operator's own children watches only say which run to pass over, and when.

Level-based: every pass recomputes the whole decision from what exists now, so it does not
matter which event woke it up, how many were missed, or whether the operator restarted in
between. Two triggers feed it:

* run events (kopf), and the operator's own watches of the run's Jobs/PyTorchJobs/Pods
  (label `cpt.dev/run`, selected by the API server: cpt_operator/k8s/watch.py): fast reaction
  to phase changes of children;
* a resync loop (every `CPT_RESYNC_SECONDS`, default 10 s) over the non-terminal runs seen:
  time-based rules (pending/hang/node timeouts) and progress.json refresh. A run that an
  event reconciled less than half an interval ago is left for the next pass.

What a reconcile reads, and why (a burst of 200 new runs used to wait 20 s for a first child
behind LISTs and repeats, docs/PERFORMANCE.md section 5):

* children come from the child index (cpt_operator/index.py), fed by the child events, written
  through by our creates/deletes, primed by one LIST of every labelled child at startup and
  checked by the same LIST every `CPT_VERIFY_SECONDS` (default 60). A run the index cannot
  vouch for (no covering LIST yet, a create that found its child already there, a child marked
  deleting) is LISTed on its own first;
* a run event reconciles from the event's body; an event that is only the echo of our own
  status patch (its resourceVersion is the one our patch returned) is skipped, and one older
  than our patch reads the run with a GET. Child events and the resync GET the run. A child
  event that changed nothing the decision reads (our own create's ADDED) wakes nobody; the
  others schedule one pass `CPT_CHILD_SETTLE_SECONDS` (0.5 s) later unless one is already
  queued, so a Job's pods appearing, being scheduled and starting cost one pass;
* admission facts are read concurrently (and cached per namespace in the client); runs whose
  pod templates differ only in their name and per-run paths share one accepted dry run;
* a pass's Events and status patch are written by a task holding the run's lock once its
  children exist, so the kopf worker is free for the next run, and after new runs pause (at
  most a few seconds), so a burst's bookkeeping follows its first children
  (docs/PERFORMANCE.md 5).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from lightkube import ApiError
from pydantic import ValidationError

from cpt_operator.api.models import (
    TERMINAL_PHASES,
    ContinualPretrainSpec,
    Phase,
)
from cpt_operator.builders import stages
from cpt_operator.builders.meta import clone
from cpt_operator.index import ALL_NAMESPACES, ChildIndex, RunKey, compare_versions
from cpt_operator.k8s.client import KubeApi
from cpt_operator.progress import StorageView, read_storage_async
from cpt_operator.reconcile import admission, conditions
from cpt_operator.reconcile.actions import CreateChild, DeleteChild, EmitEvent
from cpt_operator.reconcile.admission import Blocker
from cpt_operator.reconcile.decide import Decision, RunMeta, decide, dump_status, load_status
from cpt_operator.reconcile.observe import Observed, observe
from cpt_operator.reconcile.patch import merge_patch

log = logging.getLogger("cpt_operator")

RESYNC_SECONDS = float(os.environ.get("CPT_RESYNC_SECONDS", "10"))
CHILD_SETTLE_SECONDS = float(os.environ.get("CPT_CHILD_SETTLE_SECONDS", "0.5"))
VERIFY_SECONDS = float(os.environ.get("CPT_VERIFY_SECONDS", "60"))
STORAGE_CACHE_SECONDS = 5.0
# An accepted dry run stands for runs with the same template this long (admission.dry_run_key):
# bounds how stale a namespace's admission state (quota, policies) can be for a new run.
DRY_RUN_CACHE_SECONDS = float(os.environ.get("CPT_DRY_RUN_CACHE_SECONDS", "30"))
# At most this many passes leave their Events and status patch to a task (reconcile_locked).
# A held record is about 6 KB (the patch's dicts 3.3 KB, the sleeping task 1.4 KB, the Events:
# measured with tracemalloc), so 256 of them are 1.5 MB; at 96, a burst of 200 new runs wrote
# the last hundred runs' records in the middle of its creates (measured: 119-171 writes).
DEFERRED_RECORDS = int(os.environ.get("CPT_DEFERRED_RECORDS", "256"))
RECORD_GRACE_SECONDS = 5.0
# Deferred records wait until no pass of a new run is under way and none started or ended for
# RECORD_QUIET_SECONDS (at most RECORD_HOLD_SECONDS): a burst's Events and status patches then
# follow its first children instead of competing with them for the API server (measured:
# written during the burst, the 550 writes of 200 runs doubled its CPU and pushed the last
# first child past 5 s). The hold outlasts the benchmark's burst of 200 runs (first children
# over 3.5-4 s: a 3 s hold let the earliest records into its last half second); held records
# count against DEFERRED_RECORDS, and past that cap passes write their own.
RECORD_QUIET_SECONDS = float(os.environ.get("CPT_RECORD_QUIET_SECONDS", "0.5"))
RECORD_HOLD_SECONDS = float(os.environ.get("CPT_RECORD_HOLD_SECONDS", "8"))
TERMINAL = {p.value for p in TERMINAL_PHASES}
# Phases whose decision uses S3 (progress.json, committed checkpoints).
STORAGE_PHASES = {"Tokenizing", "PreparingWeights", "Training", "Suspended", "Converting"}


@dataclass
class DryRunEntry:
    """One dry run of a template: runs with the same key wait for it instead of asking again."""

    accepted: asyncio.Future[bool]
    expires: float = float("inf")


@dataclass
class OperatorState:
    """Process-wide state: the client, runs seen (for the resync) and per-run locks."""

    kube: KubeApi | None = None
    runs: dict[tuple[str, str], str] = field(default_factory=dict)
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    storage: dict[tuple[str, str], tuple[float, StorageView]] = field(default_factory=dict)
    last_resync: float = field(default_factory=time.monotonic)
    resync_task: asyncio.Task[None] | None = None
    index: ChildIndex = field(default_factory=ChildIndex)
    written: dict[RunKey, str] = field(default_factory=dict)
    """resourceVersion returned by our last status patch of each run (its echo is skipped)."""
    waiting: set[RunKey] = field(default_factory=set)
    """Runs with a pass queued that has not started (it reads the run afresh): coalescing."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    watches: list[asyncio.Task[None]] = field(default_factory=list)
    """The children's watches (start_child_watches)."""
    scopes: tuple[str, ...] = (ALL_NAMESPACES,)
    """What the child index LISTs: the watched namespaces, or every namespace."""
    reconciles: int = 0
    passes: dict[RunKey, float] = field(default_factory=dict)
    """When each run's last pass started (the resync skips runs an event just reconciled)."""
    roots: admission.RootIndex = field(default_factory=admission.RootIndex)
    """The S3 prefixes each run owns (from the run watch): no two runs may overlap."""
    records: set[asyncio.Task[None]] = field(default_factory=set)
    """Tasks writing passes' Events and status patches (deferred records): at most
    DEFERRED_RECORDS, given a few seconds to finish when the operator stops."""
    dry_runs: dict[str, DryRunEntry] = field(default_factory=dict)
    """Dry runs by `admission.dry_run_key`: in flight, or accepted (until `expires`)."""
    new_run_at: float = float("-inf")
    """Event-loop time a pass of a run without children yet last started or ended."""
    new_passes: int = 0
    """Passes of runs without children yet under way (deferred records wait for none)."""


STATE = OperatorState()


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
        key = admission.dry_run_key(spec, run.ref)
    except ValueError:  # an invalid spec fails in planning with its own message
        return ()
    ns = run.namespace
    secrets = admission.secret_refs(spec)
    # Independent questions: asked at once, answered in the order the blockers are listed.
    answers = await asyncio.gather(
        asyncio.gather(*(kube.secret_exists(ns, secret) for _, secret in secrets)),
        kube.pod_security_level(ns),
        dry_run(kube, lambda: admission.dry_run_manifests(spec, run.ref), ns, key),
    )
    exists, level, asked = answers
    found: list[Blocker] = [
        admission.missing_secret(field_, secret, ns)
        for (field_, secret), there in zip(secrets, exists, strict=True)
        if there is False
    ]
    found += admission.pod_security_problems(spec, level)
    mine = admission.RunRoots.of(body, spec)
    if mine is not None:
        found += admission.shared_roots(mine, STATE.roots.overlapping(mine))
    for what, field_, message in asked:
        if message:
            found.append(admission.rejected(what, field_, message))
    return tuple(found)


Manifests = list[tuple[str, str, dict[str, Any]]]
"""(what, spec field, manifest), as admission.dry_run_manifests builds them."""


async def dry_run(
    kube: KubeApi, build: Callable[[], Manifests], namespace: str, key: str | None
) -> list[tuple[str, str, str]]:
    """(what, spec field, the API server's message: "" = accepted) for server-side dry runs
    of the manifests `build` makes. Runs whose templates share a key share one dry run:
    concurrent ones wait for it, later ones reuse its acceptance for DRY_RUN_CACHE_SECONDS
    and get [] without building anything (the run's own manifests are the costliest part of
    its admission). A rejection is never shared (its message names the other run's
    objects): each rejected run asks for itself."""

    async def ask() -> list[tuple[str, str, str]]:
        manifests = build()
        messages = await asyncio.gather(
            *(kube.dry_run_create(m, namespace) for _, _, m in manifests)
        )
        return [(what, f, msg) for (what, f, _), msg in zip(manifests, messages, strict=True)]

    if key is None or DRY_RUN_CACHE_SECONDS <= 0:
        return await ask()
    now = time.monotonic()
    entry = STATE.dry_runs.get(key)
    if entry is not None and entry.expires > now and await asyncio.shield(entry.accepted):
        return []
    if len(STATE.dry_runs) > 1024:
        for stale in [k for k, e in STATE.dry_runs.items() if e.expires <= now]:
            del STATE.dry_runs[stale]
    mine = DryRunEntry(asyncio.get_running_loop().create_future())
    STATE.dry_runs[key] = mine
    accepted = False
    try:
        asked = await ask()
        accepted = not any(msg for _, _, msg in asked)
        return asked
    finally:
        mine.accepted.set_result(accepted)
        if accepted:
            mine.expires = time.monotonic() + DRY_RUN_CACHE_SECONDS
        elif STATE.dry_runs.get(key) is mine:
            del STATE.dry_runs[key]


Children = tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]


async def read_children(kube: KubeApi, key: RunKey, index: ChildIndex | None) -> Children:
    """From the index when it can vouch for the run, else a LIST of the run (merged into the
    index, see cpt_operator/index.py). Without an index (tests of the glue): a LIST."""
    if index is None:
        return await kube.list_children(*key)
    if index.needs_list(key):
        token = index.begin_list()
        try:
            jobs, ptjs, pods = await kube.list_children(*key)
        except BaseException:
            index.abort_list()
            raise
        index.end_list(token, [*jobs, *ptjs, *pods], run=key)
    return index.children(key)


async def verify_index(kube: KubeApi, index: ChildIndex, scopes: tuple[str, ...]) -> None:
    """One LIST of every labelled child per scope: primes the index at startup and, from the
    resync, repairs what lost events (a DELETED the watch never delivered) left behind."""
    for scope in scopes:
        token = index.begin_list()
        try:
            listed = await kube.list_labelled(None if scope == ALL_NAMESPACES else scope)
        except BaseException:
            index.abort_list()
            raise
        index.end_list(token, listed, scope=scope)


async def observe_run(
    kube: KubeApi, body: Mapping[str, Any], children: Children | None = None
) -> Observed:
    meta = body.get("metadata") or {}
    namespace, name = str(meta["namespace"]), str(meta["name"])
    if children is None:
        children = await kube.list_children(namespace, name)
    jobs, ptjs, pods = children
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


async def _post_events(kube: KubeApi, body: Mapping[str, Any], events: list[EmitEvent]) -> None:
    for event in events:  # one after the other: their order is the story of the run
        await kube.post_event(body, event.type, event.reason, event.message)


Record = Callable[[], Awaitable[None]]


def _event_ref(body: Mapping[str, Any]) -> dict[str, Any]:
    """What an Event needs of its run: kept instead of the whole body by a deferred record."""
    meta = body.get("metadata") or {}
    keep = ("name", "namespace", "uid", "resourceVersion")
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in keep if k in meta},
    }


async def apply(
    kube: KubeApi,
    body: Mapping[str, Any],
    decision: Decision,
    index: ChildIndex | None = None,
    *,
    defer_record: bool = False,
) -> Record | None:
    """Children first (what the user waits for), then the Events of the decision in their
    order, then the status: a crash in between is repaired by the next reconcile (see
    reconcile/decide.py). Creates and deletes are written through to the child index.
    `defer_record`: the Events and the status patch are returned as a `Record` to run later
    (holding only the event reference and the patch) instead of being written here."""
    meta = body.get("metadata") or {}
    namespace, name = str(meta["namespace"]), str(meta["name"])
    key = (namespace, name)
    events: list[EmitEvent] = []
    for action in decision.actions:
        if isinstance(action, CreateChild):
            try:
                created = await kube.create(action.manifest, namespace)
            except ApiError as err:
                if err.status.code not in (400, 422):
                    raise
                # Invalid, and retrying cannot change that: fail the run, do not loop.
                await _post_events(kube, body, events)
                await reject_run(kube, body, action, str(err.status.message or err))
                return None
            if index is not None:
                if isinstance(created, Mapping):
                    index.created(created)
                elif not created:
                    index.create_conflict(key)
            log.info(
                "%s/%s: %s %s %s",
                namespace,
                name,
                "created" if created else "found",
                action.kind,
                action.name,
            )
        elif isinstance(action, DeleteChild):
            issued = await kube.delete(
                action.api_version,
                action.kind,
                action.name,
                namespace,
                propagation=action.propagation,
                grace_period=action.grace_period,
            )
            if index is not None:
                index.deleting(key, action.kind, action.name, gone=not issued)
            log.info("%s/%s: deleted %s %s", namespace, name, action.kind, action.name)
        elif isinstance(action, EmitEvent):
            events.append(action)
    patch = merge_patch(body.get("status") or {}, decision.status) if decision.changed else {}
    ref = _event_ref(body) if defer_record else body

    async def record() -> None:
        await _post_events(kube, ref, events)
        if patch:
            version = await kube.patch_status(namespace, name, patch)
            if version:
                STATE.written[key] = version

    if not defer_record:
        await record()
        return None
    return record if events or patch else None


async def reconcile(
    kube: KubeApi,
    namespace: str,
    name: str,
    *,
    now: datetime | None = None,
    body: Mapping[str, Any] | None = None,
    index: ChildIndex | None = None,
    deferred: list[Record] | None = None,
) -> Decision | None:
    """One level-based pass over a run. None when there is nothing to do (gone, being
    deleted, or finished): terminal phases are sticky and cost no reads of children.
    `body`: the run as a current event delivered it (else it is read); `index`: where the
    children come from (else they are listed); `deferred`: where to leave the pass's Events
    and status patch instead of writing them (see `reconcile_locked`)."""
    STATE.reconciles += 1
    STATE.passes[(namespace, name)] = time.monotonic()
    if body is None:
        body = await kube.get_run(namespace, name)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return None
    status = body.get("status") or {}
    if status.get("phase") in TERMINAL:
        STATE.runs[(namespace, name)] = str(status["phase"])
        return None
    new_run = status.get("phase") in PLANNING_PHASES
    loop = asyncio.get_running_loop()
    if new_run:  # deferred records wait while it plans and creates (_until_new_runs_pause)
        STATE.new_run_at = loop.time()
        STATE.new_passes += 1
    try:
        children = await read_children(kube, (namespace, name), index)
        observed = await observe_run(kube, body, children)
        decision = decide(
            RunMeta.of(body), body.get("spec") or {}, status, observed, now or datetime.now(UTC)
        )
        record = await apply(kube, body, decision, index, defer_record=deferred is not None)
    finally:
        if new_run:
            STATE.new_passes = max(0, STATE.new_passes - 1)  # cleanup() may have reset it
            STATE.new_run_at = loop.time()
    if record is not None and deferred is not None:
        deferred.append(record)
    STATE.runs[(namespace, name)] = str(decision.status.get("phase", ""))
    return decision


async def reconcile_locked(
    namespace: str, name: str, body: Mapping[str, Any] | None = None, *, queued: bool = False
) -> Decision | None:
    """Serialises reconciles of one run (events and the resync may race). `queued`: the
    caller put the run in STATE.waiting (coalescing); it leaves it once the pass starts."""
    if STATE.kube is None:
        if queued:
            STATE.waiting.discard((namespace, name))
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    key = (namespace, name)
    lock = STATE.locks.setdefault(key, asyncio.Lock())
    try:
        await lock.acquire()
    except BaseException:
        if queued:  # cancelled while waiting
            STATE.waiting.discard(key)
        raise
    # Over the cap, the pass writes its own record: bounds what waits in memory.
    deferred: list[Record] | None = [] if len(STATE.records) < DEFERRED_RECORDS else None
    try:
        if queued:
            STATE.waiting.discard(key)  # from here on, later changes need a new pass
        if body is not None and _before_our_write(key, body):
            body = None  # our deferred record landed while this pass waited: read the run
        try:
            decision = await reconcile(
                STATE.kube, namespace, name, body=body, index=STATE.index, deferred=deferred
            )
        except ApiError as err:
            raise kopf.TemporaryError(f"API error: {err}", delay=5) from err
    except BaseException:
        lock.release()
        raise
    if not deferred:
        lock.release()
        return decision
    # The Events and the status patch wait behind other runs' creates (request priorities):
    # written by a task that keeps the run's lock, so the kopf worker (one of worker_limit's
    # slots) is free for the next run's event, and the pass's body and manifests are freed.
    task = asyncio.create_task(_record(key, deferred[0], lock))
    STATE.records.add(task)
    task.add_done_callback(STATE.records.discard)
    return decision


def _before_our_write(key: RunKey, body: Mapping[str, Any]) -> bool:
    """Whether `body` predates our last status patch of the run (or cannot be ordered)."""
    written = STATE.written.get(key)
    if written is None:
        return False
    order = compare_versions((body.get("metadata") or {}).get("resourceVersion"), written)
    return order is None or order < 0


def _hold_left(now: float, new_run_at: float, deadline: float, in_flight: int = 0) -> float:
    """Seconds a deferred record still waits (<= 0: write it now)."""
    if in_flight > 0:  # a new run is planning or creating its first children right now
        return min(RECORD_QUIET_SECONDS, deadline - now)
    return min(new_run_at + RECORD_QUIET_SECONDS, deadline) - now


async def _until_new_runs_pause() -> None:
    """Return once no pass of a new run (one still planning its first children) is under
    way and none started or ended for RECORD_QUIET_SECONDS, or after RECORD_HOLD_SECONDS.
    Pass starts alone are not enough: while the API server is slowest, every worker waits
    on a create and no pass starts, and records written then slowed the creates further
    (measured: half the bench's bursts wrote 90-240 Events before their last first child)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECORD_HOLD_SECONDS
    while (left := _hold_left(loop.time(), STATE.new_run_at, deadline, STATE.new_passes)) > 0:
        await asyncio.sleep(left)


async def _record(key: RunKey, record: Record, lock: asyncio.Lock) -> None:
    try:
        await _until_new_runs_pause()
        await record()
    except Exception as err:  # level-based: the next pass decides and writes it again
        log.warning("recording the pass of %s/%s failed: %s", key[0], key[1], err)
        STATE.runs.setdefault(key, "")
        schedule_reconcile(key, 5.0)
    finally:
        lock.release()


def schedule_reconcile(key: RunKey, delay: float) -> None:
    """A pass over the run in `delay` seconds, unless one that has not started yet is
    already queued (it will read the newest state). Child changes come in bursts (a Job's
    pods appear, are scheduled, start): one pass after they settle, not one per event, and
    the passes of new runs do not queue behind them."""
    if key in STATE.waiting:
        return
    STATE.waiting.add(key)
    task = asyncio.create_task(_settled(key, delay))
    STATE.tasks.add(task)
    task.add_done_callback(STATE.tasks.discard)


async def _settled(key: RunKey, delay: float) -> None:
    try:
        await asyncio.sleep(delay)
    except asyncio.CancelledError:
        STATE.waiting.discard(key)
        raise
    try:
        await reconcile_locked(*key, queued=True)
    except Exception as err:  # the resync tries again
        log.warning("reconcile of %s/%s failed: %s", key[0], key[1], err)


async def resync_forever(interval: float) -> None:
    verified = time.monotonic()
    while True:
        if STATE.kube is not None and time.monotonic() - verified >= VERIFY_SECONDS:
            try:
                await verify_index(STATE.kube, STATE.index, STATE.scopes)
            except Exception as err:  # runs fall back to their own LISTs meanwhile
                log.warning("verification LIST of children failed: %s", err)
            verified = time.monotonic()
        for (namespace, name), phase in sorted(STATE.runs.items()):
            if phase in TERMINAL:
                continue
            if (namespace, name) in STATE.waiting:
                continue  # a pass that has not started yet is queued
            if time.monotonic() - STATE.passes.get((namespace, name), -interval) < interval / 2:
                continue  # an event just reconciled it (under a burst: most runs)
            STATE.waiting.add((namespace, name))
            try:
                await reconcile_locked(namespace, name, queued=True)
            except Exception as err:  # one broken run must not stop the others
                log.warning("resync of %s/%s failed: %s", namespace, name, err)
        STATE.last_resync = time.monotonic()
        await asyncio.sleep(interval)


async def prime_roots(kube: KubeApi, scopes: tuple[str, ...]) -> None:
    """Which S3 prefixes the existing runs own, before any run is planned: the run watch's
    first events may arrive in any order, and a new run must see every older one."""
    try:
        for scope in scopes:
            for body in await kube.list_runs(None if scope == ALL_NAMESPACES else scope):
                remember_roots(body)
    except ApiError as err:
        log.warning("could not list the runs (shared-prefix check uses the watch only): %s", err)


def remember_roots(body: Mapping[str, Any]) -> None:
    meta = body.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    known = STATE.roots.get(key)
    if (
        known is not None
        and all(known.version)
        and known.version == admission.RunRoots.version_of(body)
    ):
        return  # the echo of a status write: same spec, nothing to validate again
    roots = admission.RunRoots.of(body)
    if roots is None:
        STATE.roots.drop(key)
    else:
        STATE.roots.put(roots)


def run_event_body(key: RunKey, body: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """What to reconcile a run event from: "skip" (the echo of our own status patch), the
    event's body (current), or None (older than our last patch, or unknown: read it)."""
    if not body:
        return None
    version = (body.get("metadata") or {}).get("resourceVersion")
    order = compare_versions(version, STATE.written.get(key))
    if order == 0:
        return SKIP
    if order is None and STATE.written.get(key) is not None:
        return None
    if order is not None and order < 0:
        return None
    current: Mapping[str, Any] = clone(dict(body))  # the pass outlives kopf's body view
    return current


SKIP: Mapping[str, Any] = {"skip": True}


def forget_run(key: RunKey) -> None:
    """A deleted run: drop everything kept about it."""
    STATE.runs.pop(key, None)
    STATE.locks.pop(key, None)
    STATE.storage.pop(key, None)
    STATE.written.pop(key, None)
    STATE.passes.pop(key, None)
    STATE.index.forget(key)
    STATE.roots.drop(key)
