"""The controller: what happens to a ContinualPretrain, top to bottom.

`kubectl apply` → kopf's watch delivers the run to `run_event`, which starts the run's loop
(`run_loop`, one asyncio task per live run). The loop calls `reconcile` in a worker thread
whenever it is woken, and every `resync_seconds` without a wake-up:

* `run_event` wakes it when the run is new or its spec changed (metadata.generation; status
  writes are the operator's own, so their echo wakes nobody);
* `child_event` wakes it when one of its Jobs or PyTorchJobs changed (label cpt.dev/run);
* the resync applies the time-based rules (pending, hang and node timeouts) and refreshes
  progress from S3.

`reconcile` is level-based: it reads the run and its children, reduces them to facts
(reconcile/observe.py), lets the pure phase machine decide (reconcile/decide.py), then
applies the decision: children first, then the Events, then one status patch if the status
changed. It does not matter which wake-up led to it, how many were missed, or whether the
operator restarted in between. One loop per run means a run is never reconciled twice at
once, without locks.

Why not `@kopf.daemon`, kopf's own per-object loop: kopf puts a finalizer on every object
with a daemon or timer, and a finalizer makes deleting a run (or its namespace) hang while
the operator is down. The operator keeps no finalizer: children go with the run through
ownerReferences, and S3 data stays. Errors: kopf does not retry `@kopf.on.event` handlers
(docs: errors), so a failed pass is logged and the loop's next resync is the retry.

Run with `python -m cpt_operator` (cpt_operator/__main__.py) or
`kopf run -m cpt_operator.handlers --standalone -A`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from pydantic import ValidationError

from cpt_operator.api import planner
from cpt_operator.api.models import (
    GROUP,
    PLURAL,
    TERMINAL_PHASES,
    VERSION,
    Phase,
    parse_spec,
)
from cpt_operator.builders import stages
from cpt_operator.builders.meta import RUN_LABEL, STAGE_LABEL
from cpt_operator.builders.precompile import precompile_stage
from cpt_operator.kube import ApiException, Kube, KubeApi, api_client, error_message
from cpt_operator.metrics import OperatorMetrics
from cpt_operator.progress import StorageView, read_json, read_storage
from cpt_operator.reconcile import accept, conditions, guard
from cpt_operator.reconcile.actions import CreateChild, DeleteChild, EmitEvent
from cpt_operator.reconcile.admission import Blocker, Policy, RunRoots
from cpt_operator.reconcile.decide import RunMeta, decide, dump_status, load_status
from cpt_operator.reconcile.observe import Observed, observe
from cpt_operator.reconcile.patch import merge_patch
from cpt_operator.settings import OperatorSettings

log = logging.getLogger("cpt_operator")

RunKey = tuple[str, str]
DEFAULT_POLICY = Policy()
TERMINAL = {p.value for p in TERMINAL_PHASES}
PLANNING_PHASES = {None, "", "Pending", "Planning"}
"""Phases before the first child: admission checks run, there are no pods to read."""
STORAGE_PHASES = {"Tokenizing", "PreparingWeights", "Training", "Suspended", "Converting"}
"""Phases whose decision reads S3 (progress.json, committed checkpoints)."""
SETTLE_SECONDS = 1.0
"""The least time between two passes over one run: a child's events come in bursts (created,
its pods created, scheduled, started), and one pass after them reads the same as one per
event. A run's first pass is never delayed."""


# -- one pass over a run (blocking; runs in a worker thread) ----------------------------------


def reconcile(
    kube: KubeApi,
    namespace: str,
    name: str,
    others: Sequence[RunRoots] = (),
    now: datetime | None = None,
    *,
    memory: accept.Memory | None = None,
    policy: Policy = DEFAULT_POLICY,
    verify_terminal: bool = False,
) -> str | None:
    """One level-based pass over a run; returns its phase afterwards, None when it is gone
    or being deleted. Terminal phases are sticky and cost no further reads, unless a new
    generation may revive the run or `verify_terminal` (the phase was not the operator's
    own write) asks to check it against the children. The pass acts on the last accepted
    spec (reconcile/accept.py, reconcile/guard.py). `others`: the S3 prefixes of the other
    runs, for the shared-prefix check."""
    body = kube.get_run(namespace, name)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return None
    now = now or datetime.now(UTC)
    generation = int(body["metadata"].get("generation") or 1)
    start = guard.begin(
        kube, body, others, memory or accept.Memory(), policy, now, verify_terminal=verify_terminal
    )
    old = body.get("status") or {}
    if start is None:
        return str(old["phase"])
    decided: dict[str, Any] | None = None
    actions: list[Any] = []
    if start.spec is not None and start.status.get("phase") not in TERMINAL:
        body = {**body, "spec": start.spec, "status": start.status}
        observed = observe_run(kube, body, others, policy)
        decision = decide(RunMeta.of(body), start.spec, start.status, observed, now)
        decided, actions = decision.status, decision.actions
    status, events = guard.finish(start, decided, body.get("spec") or {}, generation, now)
    for action in actions:  # children first: what the user waits for
        if isinstance(action, CreateChild):
            try:
                created = kube.create(action.manifest, namespace)
            except ApiException as err:
                if err.status not in (400, 422):
                    raise
                # Invalid, and retrying cannot change that: fail the run, do not loop.
                post_events(kube, body, events)
                reject_run(kube, body, action, error_message(err))
                return "Failed"
            verb = "created" if created else "found"
            log.info("%s/%s: %s %s %s", namespace, name, verb, action.kind, action.name)
        elif isinstance(action, DeleteChild):
            kube.delete(
                action.api_version,
                action.kind,
                action.name,
                namespace,
                propagation=action.propagation,
                grace_period=action.grace_period,
            )
            log.info("%s/%s: deleted %s %s", namespace, name, action.kind, action.name)
        else:
            events.append(action)
    post_events(kube, body, events)  # in their order: the story of the run
    if patch := merge_patch(old, status):
        kube.patch_status(namespace, name, patch)
    return str(status.get("phase") or "")


def observe_run(
    kube: KubeApi,
    body: Mapping[str, Any],
    others: Sequence[RunRoots],
    policy: Policy = DEFAULT_POLICY,
) -> Observed:
    """The facts `decide` needs: children by label, pods once children exist, the nodes of
    training pods, S3 in the phases that read it, admission facts before the first child."""
    meta = body.get("metadata") or {}
    namespace, name = str(meta["namespace"]), str(meta["name"])
    phase = (body.get("status") or {}).get("phase")
    jobs, ptjs = kube.list_children(namespace, name)
    pods = [] if phase in PLANNING_PHASES else kube.list_pods(namespace, name)
    train_nodes = [
        str(p["spec"]["nodeName"])
        for p in pods
        if (p.get("spec") or {}).get("nodeName")
        and ((p.get("metadata") or {}).get("labels") or {}).get(STAGE_LABEL) == "train"
    ]
    view = storage_view(body) if phase in STORAGE_PHASES else StorageView()
    suspended = any(((j.get("spec") or {}).get("runPolicy") or {}).get("suspend") for j in ptjs)
    suspended = suspended or any((j.get("spec") or {}).get("suspend") for j in jobs)
    return observe(
        workloads=kube.list_workloads(namespace) if suspended else [],
        preflight=preflight_result(body) if phase == "Preflight" else None,
        precompiled=phase == "Precompiling" and precompiled(body),
        jobs=jobs,
        pytorchjobs=ptjs,
        pods=pods,
        nodes=kube.get_nodes(train_nodes) if train_nodes else [],
        progress=view.progress,
        checkpoint=view.checkpoint,
        storage_error=view.error,
        blockers=admission_blockers(kube, body, others, policy),
    )


def preflight_result(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The preflight check's result.json (rank 0 writes it before the job ends)."""
    meta = body.get("metadata") or {}
    try:
        spec = parse_spec(body.get("spec") or {})
    except ValidationError:
        return None
    return read_json(
        stages.paths(spec, str(meta.get("name")), str(meta.get("namespace"))).preflight_result
    )


def precompiled(body: Mapping[str, Any]) -> bool:
    """Whether the compile cache records the run's precompile key already."""
    meta = body.get("metadata") or {}
    try:
        spec = parse_spec(body.get("spec") or {})
    except ValidationError:
        return False
    cfg = precompile_stage(spec, str(meta.get("name")), str(meta.get("namespace")))
    return read_json(cfg.marker_uri) is not None


def storage_view(body: Mapping[str, Any]) -> StorageView:
    meta = body.get("metadata") or {}
    try:
        spec = parse_spec(body.get("spec") or {})
    except ValidationError:
        return StorageView()
    paths = stages.paths(spec, str(meta.get("name")), str(meta.get("namespace")))
    return read_storage(paths.checkpoints, paths.progress)


def admission_blockers(
    kube: KubeApi, body: Mapping[str, Any], others: Sequence[RunRoots], policy: Policy
) -> tuple[Blocker, ...]:
    """What must hold before a run's first child exists (reconcile/guard.py). Checked only
    while planning; later generations are checked by reconcile/accept.py."""
    if (body.get("status") or {}).get("phase") not in PLANNING_PHASES:
        return ()
    try:
        spec = parse_spec(body.get("spec") or {})
    except ValueError:  # an invalid spec fails in planning with its own message
        return ()
    return tuple(guard.cluster_blockers(kube, body, spec, others, policy))


def post_events(kube: KubeApi, body: Mapping[str, Any], events: list[EmitEvent]) -> None:
    for event in events:
        kube.post_event(body, event.type, event.reason, event.message)


def reject_run(kube: KubeApi, body: Mapping[str, Any], action: CreateChild, message: str) -> None:
    """The API server refused a child built from the spec (a field it validates that the
    planning-time dry run did not see, e.g. changed mid-run): Failed, saying why."""
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
    conditions.set_ready(status, now=now, generation=generation)
    reason = conditions.transition_reason(was, "Failed")
    kube.post_event(body, "Warning", reason, f"{was} → Failed: {msg}")
    if patch := merge_patch(old, dump_status(status)):
        meta = body["metadata"]
        kube.patch_status(str(meta["namespace"]), str(meta["name"]), patch)


# -- the loops and kopf's handlers ------------------------------------------------------------


@dataclass
class Controller:
    """What the handlers share (kept in kopf's memo): the client, the worker threads, the
    runs' loops and every run's S3 prefixes (from the run watch)."""

    settings: OperatorSettings
    kube: KubeApi
    executor: ThreadPoolExecutor
    loops: dict[RunKey, RunLoop] = field(default_factory=dict)
    roots: dict[RunKey, RunRoots] = field(default_factory=dict)
    passes: int = 0
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)

    def wake(self, key: RunKey, *, start: bool = False) -> None:
        """Wake the run's loop; `start`: start one if the run has none."""
        loop = self.loops.get(key)
        if loop is None and start:
            loop = self.loops[key] = RunLoop(asyncio.Event())
            loop.task = asyncio.create_task(run_loop(self, key, loop), name=f"run {key}")
        if loop is not None:
            loop.wake.set()

    def stop(self, key: RunKey) -> None:
        loop = self.loops.pop(key, None)
        if loop is not None and loop.task is not None:
            loop.task.cancel()


@dataclass
class RunLoop:
    wake: asyncio.Event
    task: asyncio.Task[None] | None = None
    generation: Any = None
    """The run's metadata.generation last seen by `run_event`."""
    phase: str | None = None
    """The phase the loop's last pass left the run in: a terminal phase seen while this is
    not terminal was written by someone else, and is checked (reconcile/trust.py)."""
    memory: accept.Memory = field(default_factory=accept.Memory)


async def run_loop(ctl: Controller, key: RunKey, me: RunLoop) -> None:
    """Reconcile the run when woken and every resync period, until it is gone or finished."""
    loop = asyncio.get_running_loop()
    while True:
        me.wake.clear()
        others = tuple(ctl.roots.values())  # a snapshot: the thread must not see it change
        ctl.passes += 1
        started = time.perf_counter()
        verify = me.phase is not None and me.phase not in TERMINAL
        one_pass = functools.partial(
            reconcile,
            memory=me.memory,
            policy=ctl.settings.policy,
            verify_terminal=verify,
        )
        try:
            phase = await loop.run_in_executor(ctl.executor, one_pass, ctl.kube, *key, others)
        except Exception as err:  # the next wake-up or resync tries again
            log.warning("reconcile of %s/%s failed: %s", key[0], key[1], error_message(err))
            phase = ""
        ctl.metrics.observe_pass(time.perf_counter() - started, failed=phase == "")
        me.phase = phase or me.phase
        if phase is None or phase in TERMINAL:
            if ctl.loops.get(key) is me:
                del ctl.loops[key]
            return
        await asyncio.sleep(min(SETTLE_SECONDS, ctl.settings.resync_seconds))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(me.wake.wait(), ctl.settings.resync_seconds)


def controller(memo: kopf.Memo) -> Controller:
    return cast(Controller, memo["controller"])


def configure(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """Watch and request timeouts against silently stalled watches (kopf #698, #204) and
    the level of kopf's own messages posted as Events."""
    kopf_settings.posting.level = settings.posting_level_number
    kopf_settings.watching.server_timeout = 120
    kopf_settings.watching.client_timeout = 150
    kopf_settings.watching.connect_timeout = 5
    kopf_settings.networking.request_timeout = 30
    kopf_settings.networking.connect_timeout = 5


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Settings from kopf's memo (`python -m cpt_operator` passes them) or the environment
    (`kopf run`); the client; the S3 prefixes every existing run owns, before any run is
    planned (the watch's first events come in no particular order)."""
    cfg = memo.get("settings") or OperatorSettings.from_env()
    configure(settings, cfg)
    planner.warm()  # not during the first run's pass
    kube = memo.get("kube") or Kube(api_client(cfg.workers))
    ctl = Controller(cfg, kube, ThreadPoolExecutor(cfg.workers, thread_name_prefix="reconcile"))
    ctl.metrics.start(cfg)
    for scope in cfg.namespaces or (None,):
        try:
            runs = await asyncio.get_running_loop().run_in_executor(
                ctl.executor, kube.list_runs, scope
            )
        except ApiException as err:
            log.warning(
                "could not list the runs (prefix check uses the watch only): %s",
                error_message(err),
            )
            continue
        for body in runs:
            remember_roots(ctl, body)
    memo["controller"] = ctl


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    ctl = controller(memo)
    for key in list(ctl.loops):
        ctl.stop(key)
    ctl.executor.shutdown(wait=False, cancel_futures=True)
    ctl.metrics.close()


@kopf.on.probe(id="runs")
def runs_probe(memo: kopf.Memo, **_: Any) -> int:
    """Live runs, each with its loop (kopf's endpoint also fails when its event loop stalls)."""
    return len(controller(memo).loops)


@kopf.on.probe(id="passes")
def passes_probe(memo: kopf.Memo, **_: Any) -> int:
    """Reconciles since start (the benchmark's idle-writes ratio reads it)."""
    return controller(memo).passes


def remember_roots(ctl: Controller, body: Mapping[str, Any]) -> None:
    """The prefixes of the run's accepted spec (a refused edit claims none)."""
    meta = body.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    record = accept.load_record(body.get("status") or {})
    if record is not None:
        body = {**body, "spec": accept.view(body.get("spec") or {}, record)}
    roots = RunRoots.of(body)
    if roots is None:
        ctl.roots.pop(key, None)
    else:
        ctl.roots[key] = roots


@kopf.on.event(GROUP, VERSION, PLURAL)
async def run_event(
    type: str, body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any
) -> None:
    if namespace is None:
        return
    ctl, key = controller(memo), (namespace, name)
    ctl.metrics.track(body, type, ctl.executor)
    if type == "DELETED":
        ctl.stop(key)
        ctl.roots.pop(key, None)
        return
    remember_roots(ctl, body)
    status = body.get("status") or {}
    generation = body.get("metadata", {}).get("generation")
    loop = ctl.loops.get(key)
    if status.get("phase") in TERMINAL:
        if loop is not None and loop.phase is not None and loop.phase not in TERMINAL:
            loop.wake.set()  # not the operator's own write: the loop checks it
        elif status.get("observedGeneration") != generation:
            ctl.wake(key, start=True)  # an edit that may revive it (reconcile/trust.py)
            ctl.loops[key].generation = generation
        else:
            ctl.stop(key)
        return
    if loop is None or loop.generation != generation:
        ctl.wake(key, start=True)
        ctl.loops[key].generation = generation


@kopf.on.event("batch", "v1", "jobs", labels={RUN_LABEL: kopf.PRESENT})
@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels={RUN_LABEL: kopf.PRESENT})
async def child_event(
    type: str | None, namespace: str | None, labels: Mapping[str, str], memo: kopf.Memo, **_: Any
) -> None:
    """A child changed or went away: its run reconciles now. Its creation (ADDED, or kopf's
    initial listing) wakes nobody: the pass that created it already decided with it in mind.
    Never starts a loop: a run's loop starts with the run's own event."""
    if namespace is not None and type in ("MODIFIED", "DELETED"):
        controller(memo).wake((namespace, labels[RUN_LABEL]))
