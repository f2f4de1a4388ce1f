"""What the operator sees of a run, reduced to the facts the decision needs.

The client layer lists raw objects (plain dicts, exactly as the API returned them); the
functions here turn them into small frozen records. Keeping this pure means every decision
can be tested from hand-written dicts, and the decision never depends on a client library.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cpt_operator.builders.meta import ATTEMPT_LABEL, RUN_LABEL, STAGE_LABEL

KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
"""The label Kueue puts on a job's Workload: the job's uid."""

if TYPE_CHECKING:
    from cpt_operator.reconcile.admission import Blocker

__all__ = ["ATTEMPT_LABEL", "RUN_LABEL", "STAGE_LABEL"]


def parse_time(value: Any) -> datetime | None:
    """RFC 3339 from the API (always UTC, 'Z' suffix) or an ISO string from progress.json."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value).strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_time(value: datetime) -> str:
    """The API's own timestamp format (second precision, 'Z')."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return _meta(obj).get("labels") or {}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class JobState:
    """A batch/v1 Job child: finished (either way) only when its terminal condition is set."""

    name: str
    complete: bool = False
    failed: bool = False
    reason: str = ""
    message: str = ""
    active: int = 0
    succeeded: int = 0
    failed_pods: int = 0
    failed_indexes: str = ""
    deleting: bool = False
    created: datetime | None = None
    uid: str = ""
    suspended: bool = False


@dataclass(frozen=True)
class PyTorchJobState:
    """A kubeflow.org/v1 PyTorchJob child, reduced to its newest condition."""

    name: str
    attempt: int | None = None
    condition: str = ""  # Created | Running | Restarting | Succeeded | Failed | Suspended | ""
    reason: str = ""
    message: str = ""
    deleting: bool = False
    created: datetime | None = None
    uid: str = ""
    suspended: bool = False
    """spec.runPolicy.suspend: created suspended for Kueue, or suspended by it (not admitted
    yet, or evicted: preempted by a higher-priority workload)."""


@dataclass(frozen=True)
class WorkloadState:
    """Kueue's Workload of a job, reduced to why it is (not) running."""

    job_uid: str
    admitted: bool = False
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class PodState:
    name: str
    phase: str = "Pending"
    node_name: str = ""
    stage: str = ""
    attempt: int | None = None
    owner_kind: str = ""
    owner_name: str = ""
    created: datetime | None = None
    deleting: bool = False
    ready: bool = False
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    disruption: str = ""
    """The reason of a True DisruptionTarget condition (PreemptionByScheduler,
    EvictionByEvictionAPI, DeletionByTaintManager, TerminationByKubelet): the pod is being
    stopped from outside, with its grace period."""


@dataclass(frozen=True)
class NodeState:
    name: str
    ready: bool = True
    since: datetime | None = None  # lastTransitionTime of the Ready condition
    reason: str = ""


@dataclass(frozen=True)
class Progress:
    """`<ckpt>/progress.json` as written by the trainer's rank 0."""

    attempt: int | None = None
    step: int = 0
    max_steps: int | None = None
    loss: float | None = None
    tokens_per_sec: float | None = None
    mfu: float | None = None
    lr: float | None = None
    updated_at: datetime | None = None
    last_committed_step: int | None = None
    last_commit_seconds: float | None = None
    stopped_at_step: int | None = None
    eval: HeldOut | None = None


@dataclass(frozen=True)
class HeldOut:
    """progress.json's ``eval``: the latest held-out loss per source and the step it ran at."""

    step: int
    sources: tuple[tuple[str, float | None, float | None], ...]
    """(name, loss, perplexity) per source, in the trainer's order."""


@dataclass(frozen=True)
class Checkpoint:
    """The newest committed checkpoint under `<ckpt>/` (its commit marker exists)."""

    step: int
    uri: str


@dataclass(frozen=True)
class Observed:
    """Everything one reconcile knows. `storage_error` is set when S3 could not be read: the
    decision then keeps the last known progress instead of treating it as missing."""

    jobs: Mapping[str, JobState] = field(default_factory=dict)
    pytorchjobs: Mapping[str, PyTorchJobState] = field(default_factory=dict)
    pods: tuple[PodState, ...] = ()
    nodes: Mapping[str, NodeState] = field(default_factory=dict)
    progress: Progress | None = None
    checkpoint: Checkpoint | None = None
    storage_error: str = ""
    preflight: Mapping[str, Any] | None = None
    """The preflight check's result.json (read in the Preflight phase only)."""
    precompiled: bool = False
    """The compile cache records this run's precompile key (read while Precompiling)."""
    workloads: Mapping[str, WorkloadState] = field(default_factory=dict)
    """Kueue's Workloads by the uid of their job (only read while a child is suspended)."""
    blockers: tuple[Blocker, ...] = ()
    """Why the run cannot start (missing Secret, Pod Security, rejected templates): checked
    only while planning, see reconcile/admission.py."""

    def pods_of(self, owner_name: str) -> list[PodState]:
        return [p for p in self.pods if p.owner_name == owner_name]

    def training_pods(self, attempt: int | None = None) -> list[PodState]:
        return [
            p for p in self.pods if p.stage == "train" and (attempt is None or p.attempt == attempt)
        ]


def observe_job(obj: Mapping[str, Any]) -> JobState:
    meta = _meta(obj)
    status = obj.get("status") or {}
    complete = failed = False
    reason = message = ""
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            complete = True
        elif cond.get("type") == "Failed":
            failed = True
            reason, message = cond.get("reason") or "", cond.get("message") or ""
    return JobState(
        name=str(meta.get("name", "")),
        complete=complete,
        failed=failed,
        reason=reason,
        message=message,
        active=_int(status.get("active")) or 0,
        succeeded=_int(status.get("succeeded")) or 0,
        failed_pods=_int(status.get("failed")) or 0,
        failed_indexes=str(status.get("failedIndexes") or ""),
        deleting=bool(meta.get("deletionTimestamp")),
        created=parse_time(meta.get("creationTimestamp")),
        uid=str(meta.get("uid", "")),
        suspended=bool((obj.get("spec") or {}).get("suspend")),
    )


def observe_pytorchjob(obj: Mapping[str, Any]) -> PyTorchJobState:
    """The newest True condition wins (training-operator appends in order, but sorting by
    lastTransitionTime keeps us honest when it does not)."""
    meta = _meta(obj)
    conds = [
        c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"
    ]
    conds.sort(
        key=lambda c: parse_time(c.get("lastTransitionTime")) or datetime.min.replace(tzinfo=UTC)
    )
    newest = conds[-1] if conds else {}
    # A Succeeded/Failed condition is terminal even if an older-stamped one sorts later.
    for cond in conds:
        if cond.get("type") in ("Succeeded", "Failed"):
            newest = cond
    return PyTorchJobState(
        name=str(meta.get("name", "")),
        attempt=_int(_labels(obj).get(ATTEMPT_LABEL)),
        condition=str(newest.get("type", "")),
        reason=str(newest.get("reason", "")),
        message=str(newest.get("message", "")),
        deleting=bool(meta.get("deletionTimestamp")),
        created=parse_time(meta.get("creationTimestamp")),
        uid=str(meta.get("uid", "")),
        suspended=bool(((obj.get("spec") or {}).get("runPolicy") or {}).get("suspend")),
    )


def observe_workload(obj: Mapping[str, Any]) -> WorkloadState:
    """Kueue's own words: admitted, else an eviction (Evicted=True: Preempted, ...), else why
    quota is not reserved (QuotaReserved=False: Pending, "couldn't assign flavors ...
    insufficient quota ..."), else waiting."""
    conds = {str(c.get("type")): c for c in (obj.get("status") or {}).get("conditions") or []}
    job_uid = str(_labels(obj).get(KUEUE_JOB_UID_LABEL, ""))
    if str((conds.get("Admitted") or {}).get("status")) == "True":
        return WorkloadState(job_uid, admitted=True)
    for type_, wanted in (("Evicted", "True"), ("QuotaReserved", "False")):
        c = conds.get(type_) or {}
        if str(c.get("status")) == wanted:
            return WorkloadState(
                job_uid, False, str(c.get("reason") or ""), str(c.get("message") or "")
            )
    return WorkloadState(job_uid, False, "Pending", "waiting for Kueue to admit it")


def observe_pod(obj: Mapping[str, Any]) -> PodState:
    meta = _meta(obj)
    labels = _labels(obj)
    status = obj.get("status") or {}
    owner = next(
        (o for o in meta.get("ownerReferences") or [] if o.get("controller")),
        (meta.get("ownerReferences") or [{}])[0] if meta.get("ownerReferences") else {},
    )
    exit_code: int | None = None
    reason, message = str(status.get("reason") or ""), str(status.get("message") or "")
    waiting: Mapping[str, Any] = {}
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term and (exit_code is None or term.get("exitCode")):
            exit_code = _int(term.get("exitCode"))
            reason = reason or str(term.get("reason") or "")
            message = message or str(term.get("message") or "")
        # Why a container cannot start (CreateContainerConfigError: a missing Secret,
        # ImagePullBackOff, ...); the benign ContainerCreating says nothing.
        wait = (cs.get("state") or {}).get("waiting") or {}
        if wait.get("reason") not in (None, "", "ContainerCreating") and not waiting:
            waiting = wait
    ready = False
    disruption = ""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            ready = cond.get("status") == "True"
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            disruption = str(cond.get("reason") or "DisruptionTarget")
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and not reason:
            reason, message = str(cond.get("reason") or ""), str(cond.get("message") or "")
    if not reason and waiting:
        reason, message = str(waiting.get("reason") or ""), str(waiting.get("message") or "")
    return PodState(
        name=str(meta.get("name", "")),
        phase=str(status.get("phase") or "Pending"),
        node_name=str((obj.get("spec") or {}).get("nodeName") or ""),
        stage=str(labels.get(STAGE_LABEL, "")),
        attempt=_int(labels.get(ATTEMPT_LABEL)),
        owner_kind=str(owner.get("kind", "")),
        owner_name=str(owner.get("name", "")),
        created=parse_time(meta.get("creationTimestamp")),
        deleting=bool(meta.get("deletionTimestamp")),
        ready=ready,
        reason=reason,
        message=message,
        exit_code=exit_code,
        disruption=disruption,
    )


def observe_node(obj: Mapping[str, Any]) -> NodeState:
    meta = _meta(obj)
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return NodeState(
                name=str(meta.get("name", "")),
                ready=cond.get("status") == "True",
                since=parse_time(cond.get("lastTransitionTime")),
                reason=str(cond.get("reason") or ""),
            )
    # No Ready condition yet: a node that never reported is not ready.
    return NodeState(
        name=str(meta.get("name", "")), ready=False, since=None, reason="NoReadyCondition"
    )


def _num(data: Mapping[str, Any], key: str) -> float | None:
    """A finite number, or None (missing, null, not a number, NaN or infinite)."""
    value = data.get(key)
    try:
        out = None if value is None else float(value)
    except (TypeError, ValueError):
        return None
    return out if out is not None and math.isfinite(out) else None


def observe_held_out(data: Any) -> HeldOut | None:
    """``{"step": N, "sources": {name: {"loss", "perplexity"}}}``; None when malformed."""
    if not isinstance(data, Mapping) or not isinstance(data.get("sources"), Mapping):
        return None
    step = _int(data.get("step"))
    if step is None or step < 0:
        return None
    sources = tuple(
        (str(name), _num(v, "loss"), _num(v, "perplexity"))
        for name, v in data["sources"].items()
        if isinstance(v, Mapping)
    )
    return HeldOut(step=step, sources=sources)


def observe_progress(data: Mapping[str, Any] | None) -> Progress | None:
    """Tolerant of missing keys: an older trainer may write fewer fields."""
    if not data:
        return None

    def num(key: str) -> float | None:
        return _num(data, key)

    return Progress(
        attempt=_int(data.get("attempt")),
        step=_int(data.get("step")) or 0,
        max_steps=_int(data.get("maxSteps")),
        loss=num("loss"),
        tokens_per_sec=num("tokensPerSec"),
        mfu=num("mfu"),
        lr=num("lr"),
        updated_at=parse_time(data.get("updatedAt")),
        last_committed_step=_int(data.get("lastCommittedStep")),
        eval=observe_held_out(data.get("eval")),
        last_commit_seconds=num("lastCommitSeconds"),
        stopped_at_step=_int(data.get("stoppedAtStep")),
    )


def observe(
    *,
    jobs: Iterable[Mapping[str, Any]] = (),
    pytorchjobs: Iterable[Mapping[str, Any]] = (),
    pods: Iterable[Mapping[str, Any]] = (),
    nodes: Iterable[Mapping[str, Any]] = (),
    progress: Mapping[str, Any] | None = None,
    checkpoint: Checkpoint | None = None,
    storage_error: str = "",
    workloads: Iterable[Mapping[str, Any]] = (),
    preflight: Mapping[str, Any] | None = None,
    precompiled: bool = False,
    blockers: tuple[Blocker, ...] = (),
) -> Observed:
    """Build the observation from raw API objects (dicts) and the S3 reads."""
    job_states = [observe_job(j) for j in jobs]
    ptj_states = [observe_pytorchjob(j) for j in pytorchjobs]
    node_states = [observe_node(n) for n in nodes]
    return Observed(
        jobs={j.name: j for j in job_states},
        pytorchjobs={j.name: j for j in ptj_states},
        pods=tuple(sorted((observe_pod(p) for p in pods), key=lambda p: p.name)),
        nodes={n.name: n for n in node_states},
        progress=observe_progress(progress),
        checkpoint=checkpoint,
        storage_error=storage_error,
        workloads={w.job_uid: w for w in (observe_workload(o) for o in workloads)},
        preflight=preflight,
        precompiled=precompiled,
        blockers=blockers,
    )
