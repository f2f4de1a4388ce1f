"""The run's state machine: (spec, status, observed children, now) → (new status, actions).

Pure and level-based: the same inputs always give the same answer, whatever happened before.
The handler executes the actions (create-if-absent, delete, events) and only then patches the
status, so a crash between the two is repaired by the next reconcile: creates are idempotent
(deterministic names), and a training child that vanished without the status knowing why is
treated as a failed attempt.

    Pending → Planning → [Preflight] → Tokenizing → [PreparingWeights (nxd)] → Training (n)
            → Converting → Succeeded | Failed                 Suspended via spec.suspend

Terminal phases are sticky. The attempt counter lives in the run's status; attempt n+1 is only
created once nothing of attempt n is left (its pods could otherwise still hold the nodes or,
on a real cluster, still write to the checkpoint root). The new attempt resumes from the newest
committed checkpoint: the trainer finds it; the operator only records what it expects.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from cpt_operator.api import planner as api_planner
from cpt_operator.api.models import (
    TERMINAL_PHASES,
    AttemptStatus,
    CheckpointStatus,
    ConditionType,
    ContinualPretrainSpec,
    ContinualPretrainStatus,
    ExcludedNode,
    Phase,
    PlanSummary,
    ProgressStatus,
)
from cpt_operator.builders import jobs, meta, pytorchjob, stages
from cpt_operator.builders.jobs import RunRef
from cpt_operator.reconcile import conditions as cond
from cpt_operator.reconcile.actions import Action, CreateChild, DeleteChild, EmitEvent
from cpt_operator.reconcile.observe import (
    Checkpoint,
    JobState,
    Observed,
    PodState,
    PyTorchJobState,
)

Planner = Callable[[ContinualPretrainSpec], PlanSummary]

MAX_TRANSITIONS = 10
"""Instant transitions chained in one reconcile (Pending → Planning → first stage)."""

DEVICE_FAULT_MARKER = "cannot allocate unhealthy devices"
"""The kubelet's device manager refusing a pod because the node's device plugin reports its
accelerator devices (aws.amazon.com/neuron, vpc.amazonaws.com/efa, nvidia.com/gpu) unhealthy:
the pod fails with reason UnexpectedAdmissionError and this text in its message. Neuron
runtime and EFA errors (NRT/libfabric) only reach the container log, never the pod status, so
they are no signal here."""


@dataclass(frozen=True)
class RunMeta:
    name: str
    namespace: str
    uid: str
    generation: int | None = None

    @property
    def ref(self) -> RunRef:
        return RunRef(self.name, self.namespace, self.uid)

    @staticmethod
    def of(body: Mapping[str, Any]) -> RunMeta:
        m = body.get("metadata") or {}
        return RunMeta(
            name=str(m.get("name", "")),
            namespace=str(m.get("namespace", "")),
            uid=str(m.get("uid", "")),
            generation=m.get("generation"),
        )


@dataclass
class Decision:
    status: dict[str, Any]
    actions: list[Action] = field(default_factory=list)
    changed: bool = False


def dump_status(status: ContinualPretrainStatus) -> dict[str, Any]:
    """The wire form, without nulls (the CRD does not declare fields nullable)."""
    out = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return out


def load_status(raw: Mapping[str, Any] | None) -> ContinualPretrainStatus:
    """Our own status, read back. An unreadable one (hand-edited) restarts bookkeeping rather
    than wedging the run; the phase is kept when it is at least a known phase."""
    if not raw:
        return ContinualPretrainStatus()
    try:
        return ContinualPretrainStatus.model_validate(dict(raw))
    except ValidationError:
        phase = raw.get("phase")
        fresh = ContinualPretrainStatus()
        if phase in {p.value for p in Phase}:
            fresh.phase = Phase(phase)
        return fresh


def format_validation_error(err: ValidationError, prefix: str = "spec") -> str:
    """One `spec.<path>: message` per problem, e.g. `spec.training.maxSteps: ...`."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e.get("loc", ()) if p != "__root__")
        where = f"{prefix}.{path}" if path else prefix
        ctx_err = (e.get("ctx") or {}).get("error")
        problems = getattr(ctx_err, "problems", None)
        if problems:
            for sub, msg in problems:
                lines.append(f"{where}.{sub}: {msg}" if sub else f"{where}: {msg}")
            continue
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def _seconds(td: timedelta) -> float:
    return td.total_seconds()


class _Reconcile:
    """One decision in progress: a mutable copy of the status plus the actions so far."""

    def __init__(
        self,
        run: RunMeta,
        spec: ContinualPretrainSpec,
        status: ContinualPretrainStatus,
        observed: Observed,
        now: datetime,
        planner: Planner,
    ) -> None:
        self.run = run
        self.spec = spec
        self.status = status
        self.obs = observed
        self.now = now.replace(microsecond=0)
        self.planner = planner
        self.actions: list[Action] = []
        self.created = False

    # -- small helpers ---------------------------------------------------------------------

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.actions.append(EmitEvent(type_, reason, message))

    def condition(
        self, type_: ConditionType | str, value: cond.Status, reason: str, msg: str
    ) -> None:
        cond.set_condition(
            self.status, type_, value, reason, msg, now=self.now, generation=self.run.generation
        )

    def transition(self, phase: Phase, message: str, *, warning: bool = False) -> None:
        old = self.status.phase
        if old == phase:
            return
        self.status.phase = phase
        self.status.message = message
        self.event(
            "Warning" if warning else "Normal",
            cond.transition_reason(old.value, phase.value),
            f"{old.value} → {phase.value}: {message}",
        )

    def create(self, manifest: dict[str, Any]) -> None:
        self.actions.append(CreateChild.of(manifest))
        self.created = True

    def delete(self, api_version: str, kind: str, name: str, *, grace: int | None = None) -> None:
        action = DeleteChild(api_version, kind, name, "Background", grace)
        if action not in self.actions:  # chained transitions may ask twice
            self.actions.append(action)

    def fail(self, reason: str, message: str) -> None:
        self.condition(ConditionType.FAILED, "True", reason, message)
        self.condition(ConditionType.SUCCEEDED, "False", reason, message)
        self.status.completion_time = self.now
        self.transition(Phase.FAILED, f"{reason}: {message}", warning=True)

    @property
    def paths(self) -> stages.RunPaths:
        return stages.paths(self.spec, self.run.name, self.run.namespace)

    # -- the state machine -----------------------------------------------------------------

    def step(self) -> None:
        phase = self.status.phase
        if phase in TERMINAL_PHASES:
            return
        if self.spec.suspend and phase != Phase.SUSPENDED:
            self.suspend()
            return
        handler = {
            Phase.PENDING: self.pending,
            Phase.PLANNING: self.planning,
            Phase.PREFLIGHT: self.preflight,
            Phase.TOKENIZING: self.tokenizing,
            Phase.PREPARING_WEIGHTS: self.preparing_weights,
            Phase.TRAINING: self.training,
            Phase.CONVERTING: self.converting,
            Phase.SUSPENDED: self.suspended,
        }[phase]
        handler()

    def pending(self) -> None:
        if self.status.start_time is None:
            self.status.start_time = self.now
        self.status.tensorboard_uri = self.paths.tensorboard
        self.transition(Phase.PLANNING, "planning the run")

    def planning(self) -> None:
        try:
            plan = self.planner(self.spec)
        except ValueError as err:  # includes pydantic's ValidationError
            msg = format_validation_error(err) if isinstance(err, ValidationError) else str(err)
            self.condition(ConditionType.PLANNED, "False", cond.INVALID_SPEC, msg)
            self.fail(cond.INVALID_SPEC, msg)
            return
        self.status.plan = plan
        if self.obs.blockers:
            first = self.obs.blockers[0]
            msg = "; ".join(b.message for b in self.obs.blockers)
            self.condition(ConditionType.PLANNED, "False", first.reason, msg)
            self.fail(first.reason, msg)
            return
        summary = (
            f"{plan.backend} on {plan.nodes} x {plan.instance_type}, TP {plan.tensor_parallel} "
            f"PP {plan.pipeline_parallel} DP {plan.data_parallel}, {plan.max_steps} steps"
        )
        self.condition(ConditionType.PLANNED, "True", "Planned", summary)
        if self.spec.resiliency.preflight.enabled:
            self.transition(Phase.PREFLIGHT, f"planned ({summary}); checking the nodes")
        else:
            self.transition(Phase.TOKENIZING, f"planned ({summary}); tokenizing")

    def _next_after_data(self) -> Phase:
        return (
            Phase.PREPARING_WEIGHTS
            if self.spec.training.resolved_backend() == "nxd"
            else Phase.TRAINING
        )

    def preflight(self) -> None:
        name = meta.child_name(self.run.name, "preflight")
        ptj = self.obs.pytorchjobs.get(name)
        if ptj is None or ptj.deleting:
            if ptj is None:
                cfg = stages.preflight_stage(self.spec, self.run.name, self.run.namespace)
                self.create(pytorchjob.preflight_job(self.spec, self.run.ref, cfg))
                self.status.children.preflight = name
                self.status.message = f"preflight check {name} running"
            return
        if ptj.condition == "Succeeded":
            self.condition(ConditionType.PREFLIGHT_PASSED, "True", "PreflightSucceeded", name)
            self.transition(Phase.TOKENIZING, "preflight passed; tokenizing")
            return
        if ptj.condition in ("Failed", "Restarting"):
            msg = f"{name}: {ptj.reason} {ptj.message}".strip()
            self.condition(ConditionType.PREFLIGHT_PASSED, "False", cond.PREFLIGHT_FAILED, msg)
            self.fail(cond.PREFLIGHT_FAILED, msg)
            return
        stuck = self._pending_too_long(self.obs.pods_of(name))
        if stuck is not None:
            msg = f"{name}: pod {stuck.name} unschedulable: {stuck.message or stuck.reason}"
            self.delete("kubeflow.org/v1", "PyTorchJob", name)
            self.condition(ConditionType.PREFLIGHT_PASSED, "False", cond.PENDING_TIMEOUT, msg)
            self.fail(cond.PREFLIGHT_FAILED, msg)

    def _stage_job(
        self,
        component: meta.Component,
        build: Callable[[], dict[str, Any]],
        *,
        ready: ConditionType,
        failed_reason: str,
        next_phase: Phase,
        running_msg: str,
        done_msg: str,
    ) -> None:
        name = meta.child_name(self.run.name, component)
        job = self.obs.jobs.get(name)
        if job is None:
            self.create(build())
            setattr(self.status.children, component, name)
            self.condition(ready, "False", "InProgress", running_msg)
            self.status.message = running_msg
            return
        if job.deleting:
            return
        if job.complete:
            self.condition(ready, "True", "Completed", done_msg)
            self.transition(next_phase, done_msg)
            return
        if job.failed:
            detail = f"Job {name} failed: {job.reason}: {job.message}".rstrip(": ")
            if job.failed_indexes:
                detail += f" (failed shard indexes {job.failed_indexes})"
            said = next(
                (p.message for p in self.obs.pods_of(name) if p.phase == "Failed" and p.message),
                "",
            )
            if said:  # the stage's own words (its termination message): field and fix
                detail += f": {said}"
            self.condition(ready, "False", failed_reason, detail)
            self.fail(failed_reason, detail)
            return
        stuck = self._tool_job_not_started(job)
        if stuck:
            # Deleted so its pods cannot start later for a run that already failed.
            self.delete("batch/v1", "Job", name)
            self.condition(ready, "False", cond.PENDING_TIMEOUT, stuck)
            self.fail(failed_reason, stuck)

    def tokenizing(self) -> None:
        cfg = stages.tokenize_stage(self.spec, self.run.name, self.run.namespace)
        self._stage_job(
            "tokenize",
            lambda: jobs.tokenize_job(self.spec, self.run.ref, cfg),
            ready=ConditionType.DATA_READY,
            failed_reason=cond.TOKENIZATION_FAILED,
            next_phase=self._next_after_data(),
            running_msg=f"tokenizing {self.spec.data.shards} shard(s) into {cfg.output_uri}",
            done_msg=f"tokenized data in {cfg.output_uri}",
        )

    def preparing_weights(self) -> None:
        kv = self.status.plan.kv_size_multiplier if self.status.plan else 1
        cfg = stages.convert_to_nxd_stage(
            self.spec, self.run.name, self.run.namespace, kv_size_multiplier=kv
        )
        self._stage_job(
            "weights",
            lambda: jobs.weights_job(self.spec, self.run.ref, cfg),
            ready=ConditionType.WEIGHTS_READY,
            failed_reason=cond.WEIGHT_CONVERSION_FAILED,
            next_phase=Phase.TRAINING,
            running_msg=f"converting {cfg.model_uri} to the NxD layout in {cfg.output_uri}",
            done_msg=f"NxD weights in {cfg.output_uri}",
        )

    def converting(self) -> None:
        self._refresh_progress()
        cfg = stages.export_stage(self.spec, self.run.name, self.run.namespace)
        self._stage_job(
            "export",
            lambda: jobs.export_job(self.spec, self.run.ref, cfg),
            ready=ConditionType.EXPORTED,
            failed_reason=cond.EXPORT_FAILED,
            next_phase=Phase.SUCCEEDED,
            running_msg=f"exporting the Hugging Face model to {cfg.output_uri}",
            done_msg=f"Hugging Face model in {cfg.output_uri}",
        )
        if self.status.phase == Phase.SUCCEEDED:
            self.status.output_uri = cfg.output_uri
            self.status.completion_time = self.now
            self.condition(ConditionType.SUCCEEDED, "True", "Succeeded", cfg.output_uri)
            self.condition(ConditionType.FAILED, "False", "Succeeded", "")

    # -- training and recovery -------------------------------------------------------------

    def _attempt_record(self) -> AttemptStatus:
        n = self.status.attempt
        if self.status.attempts and self.status.attempts[-1].attempt == n:
            return self.status.attempts[-1]
        rec = AttemptStatus(attempt=n)
        self.status.attempts.append(rec)
        return rec

    def _pending_too_long(self, pods: list[PodState]) -> PodState | None:
        limit = self.spec.resiliency.pending_timeout_seconds
        if not limit:
            return None
        for pod in pods:
            waiting = pod.phase == "Pending" and not pod.deleting and pod.created is not None
            if waiting and pod.created and _seconds(self.now - pod.created) > limit:
                return pod
        return None

    def _tool_job_not_started(self, job: JobState) -> str:
        """Why a tool Job (tokenize, weights, export) never got going within
        pendingTimeoutSeconds, or "": a pod still Pending (unschedulable, or a container that
        cannot be created, e.g. a missing Secret), or no pod at all (the Job controller was
        refused: a ResourceQuota, a missing PriorityClass, Pod Security admission)."""
        limit = self.spec.resiliency.pending_timeout_seconds
        if not limit or job.created is None:
            return ""
        pods = self.obs.pods_of(job.name)
        stuck = self._pending_too_long(pods)
        if stuck is not None:
            why = ": ".join(x for x in (stuck.reason, stuck.message) if x) or "not started"
            return f"Job {job.name}: pod {stuck.name} Pending for more than {limit}s: {why}"
        started = pods or job.active or job.succeeded or job.failed_pods
        if not started and _seconds(self.now - job.created) > limit:
            return (
                f"Job {job.name} has no pods after {limit}s: the Job controller could not "
                "create them (a ResourceQuota, a missing PriorityClass, Pod Security admission, "
                f"...; see kubectl describe job {job.name})"
            )
        return ""

    def _bad_node(self, pods: list[PodState]) -> tuple[PodState, str] | None:
        """A pod whose node is NotReady past the grace period, or gone."""
        grace = self.spec.resiliency.node_not_ready_seconds
        for pod in pods:
            if not pod.node_name or pod.phase in ("Succeeded", "Failed"):
                continue
            node = self.obs.nodes.get(pod.node_name)
            if node is None:
                return pod, f"node {pod.node_name} of pod {pod.name} no longer exists"
            if not node.ready:
                since = node.since or self.now
                if _seconds(self.now - since) >= grace:
                    return pod, (
                        f"node {pod.node_name} of pod {pod.name} NotReady since "
                        f"{since.isoformat()} ({node.reason or 'no reason'})"
                    )
        return None

    def _failed_nodes(self, pods: list[PodState]) -> list[tuple[str, str, str]]:
        """(node, exclusion reason, why) for every node of `pods` that failed the attempt:
        gone, NotReady past the grace period, or refusing a pod for unhealthy devices."""
        grace = self.spec.resiliency.node_not_ready_seconds
        found: dict[str, tuple[str, str]] = {}
        for pod in pods:
            if not pod.node_name or pod.node_name in found:
                continue
            node = self.obs.nodes.get(pod.node_name)
            if node is None:
                found[pod.node_name] = (cond.EXCLUDED_GONE, "the node no longer exists")
            elif not node.ready and _seconds(self.now - (node.since or self.now)) >= grace:
                found[pod.node_name] = (
                    cond.EXCLUDED_NOT_READY,
                    f"NotReady for {grace}s or more ({node.reason or 'no reason'})",
                )
            elif pod.phase == "Failed" and DEVICE_FAULT_MARKER in pod.message:
                found[pod.node_name] = (
                    cond.EXCLUDED_DEVICE_UNHEALTHY,
                    f"the kubelet refused pod {pod.name}: {pod.message}",
                )
        return [(node, reason, why) for node, (reason, why) in found.items()]

    def _exclusions_on(self) -> bool:
        return self.spec.resiliency.exclude_failed_nodes

    def _exclude_failed_nodes(self, name: str, attempt: int) -> None:
        """Record the nodes attempt `attempt` failed on, so later attempts avoid them even
        once they are Ready again (a NotReady taint goes away with the condition)."""
        if not self._exclusions_on():
            return
        known = {e.node for e in self.status.excluded_nodes}
        for node, reason, why in self._failed_nodes(self.obs.pods_of(name)):
            if node in known:
                continue
            known.add(node)
            self.status.excluded_nodes.append(
                ExcludedNode(node=node, reason=reason, attempt=attempt, since=self.now)
            )
            self.event(
                "Warning",
                cond.NODE_EXCLUDED,
                f"node {node} is excluded from the later attempts of this run: {reason} in "
                f"attempt {attempt}: {why}",
            )
        self._bound_exclusions()

    def _bound_exclusions(self) -> None:
        """At most maxExcludedNodes: the oldest exclusions drop out (their nodes may be used
        again), so a run on a small or churning node group cannot exclude itself off it."""
        limit = self.spec.resiliency.max_excluded_nodes
        while len(self.status.excluded_nodes) > limit:
            old = self.status.excluded_nodes.pop(0)
            self.event(
                "Normal",
                cond.NODE_EXCLUSION_DROPPED,
                f"node {old.node} (excluded after attempt {old.attempt}: {old.reason}) may be "
                f"used again: at most {limit} nodes are excluded "
                "(spec.resiliency.maxExcludedNodes)",
            )

    def _excluded_nodes(self) -> list[ExcludedNode]:
        """The exclusions the current attempt was built with (recorded by earlier attempts)."""
        if not self._exclusions_on():
            return []
        n = self.status.attempt
        return [e for e in self.status.excluded_nodes if e.attempt < n]

    def _node_gone_or_not_ready(self, node_name: str) -> bool:
        node = self.obs.nodes.get(node_name)
        return node is None or not node.ready

    def _failure_of(self, name: str, ptj: PyTorchJobState) -> tuple[str, str] | None:
        if ptj.deleting:
            return cond.JOB_DELETED, f"PyTorchJob {name} is being deleted outside the operator"
        pods = self.obs.pods_of(name)
        # A failed pod says more (which replica, exit code) than the job's generic "backoff
        # limit reached", and the job keeps failed pods: report the pod whichever came first.
        for pod in pods:
            if pod.phase == "Failed":
                code = "" if pod.exit_code is None else f" (exit code {pod.exit_code})"
                why = f": {pod.reason} {pod.message}".rstrip() if pod.reason or pod.message else ""
                return cond.POD_FAILED, f"pod {pod.name} failed{code}{why}"
        if ptj.condition == "Failed":
            return cond.JOB_FAILED, f"PyTorchJob {name} failed: {ptj.reason} {ptj.message}".strip()
        if ptj.condition == "Restarting":
            return cond.JOB_RESTARTING, f"PyTorchJob {name} is restarting pods: {ptj.message}"
        bad = self._bad_node(pods)
        if bad is not None:
            return cond.NODE_NOT_READY, bad[1]
        stuck = self._pending_too_long(pods)
        if stuck is not None:
            limit = self.spec.resiliency.pending_timeout_seconds
            excluded = self._excluded_nodes()
            note = ""
            if excluded:
                # The scheduler only says "didn't match Pod's node affinity/selector".
                names = ", ".join(f"{e.node} ({e.reason} in attempt {e.attempt})" for e in excluded)
                nodes = "1 node is" if len(excluded) == 1 else f"{len(excluded)} nodes are"
                note = (
                    f"; {nodes} excluded by this run after failing an earlier attempt: {names} "
                    "(status.excludedNodes; spec.resiliency.excludeFailedNodes, maxExcludedNodes)"
                )
            return cond.PENDING_TIMEOUT, (
                f"pod {stuck.name} Pending for more than {limit}s: "
                f"{stuck.message or stuck.reason or 'not scheduled'}{note}"
            )
        limit = self.spec.resiliency.pending_timeout_seconds
        live = [p for p in pods if not p.deleting]
        expected = self.spec.training.nodes
        created = ptj.created
        if limit and created and len(live) < expected and _seconds(self.now - created) > limit:
            # Pods the training operator cannot create never show up as Pending.
            return cond.PENDING_TIMEOUT, (
                f"PyTorchJob {name} has {len(live)} of {expected} pods after {limit}s: "
                "the training operator could not create the others (Pod Security "
                f"admission, a ResourceQuota, ...; see kubectl describe pytorchjob {name})"
            )
        return None

    def _track_progress(self, name: str, rec: AttemptStatus) -> tuple[str, str] | None:
        """Update the hang clock; a failure when the attempt made no step progress for
        hangTimeoutSeconds after all its pods were Running."""
        pods = [p for p in self.obs.pods_of(name) if not p.deleting]
        expected = self.spec.training.nodes
        if rec.running_since is None:
            if len(pods) >= expected and all(p.phase == "Running" for p in pods):
                rec.running_since = self.now
            return None
        prog = self.obs.progress
        ours = prog is not None and (prog.attempt is None or prog.attempt == rec.attempt)
        if prog is not None and ours and (rec.last_step is None or prog.step != rec.last_step):
            rec.last_step = prog.step
            rec.last_step_time = self.now
        limit = self.spec.resiliency.hang_timeout_seconds
        if self.obs.storage_error:
            # Without progress.json we cannot tell a hang from an unreachable S3; the trainer
            # could not report either, so it gets a whole timeout again once S3 is back.
            rec.last_step_time = self.now
            return None
        if not limit:
            return None
        clock = max(rec.running_since, rec.last_step_time or rec.running_since)
        if _seconds(self.now - clock) > limit:
            step = "no step yet" if rec.last_step is None else f"still at step {rec.last_step}"
            return cond.HANG, f"no training progress for more than {limit}s ({step})"
        return None

    def _end_attempt(self, name: str, reason: str, message: str) -> None:
        n = self.status.attempt
        max_attempts = self.spec.resiliency.max_attempts
        rec = self._attempt_record()
        rec.end_time = self.now
        rec.reason, rec.message = reason, message
        self.event(
            "Warning", "AttemptFailed", f"attempt {n} of {max_attempts}: {reason}: {message}"
        )
        self._exclude_failed_nodes(name, n)
        self._teardown(keep=None)
        if n >= max_attempts:
            msg = f"all {max_attempts} training attempts failed; the last one: {reason}: {message}"
            self.condition(ConditionType.TRAINING, "False", cond.MAX_ATTEMPTS_EXCEEDED, msg)
            self.fail(cond.MAX_ATTEMPTS_EXCEEDED, msg)
            return
        self.status.attempt = n + 1
        self.status.children.train = None
        self._attempt_record()
        msg = f"attempt {n} failed ({reason}); starting attempt {n + 1} of {max_attempts}"
        self.condition(ConditionType.TRAINING, "False", reason, msg)
        self.status.message = msg
        self.event("Normal", "Restarting", msg)

    def _teardown(self, keep: str | None) -> bool:
        """Delete every training PyTorchJob except `keep`, force-delete their pods stuck on
        NotReady or vanished nodes. True when nothing of them is left."""
        clean = True
        for name, ptj in sorted(self.obs.pytorchjobs.items()):
            if name == keep or ptj.attempt is None:
                continue
            clean = False
            if not ptj.deleting:
                self.delete("kubeflow.org/v1", "PyTorchJob", name)
        for pod in self.obs.training_pods():
            if keep is not None and pod.owner_name == keep:
                continue
            clean = False
            if pod.node_name and self._node_gone_or_not_ready(pod.node_name):
                self.delete("v1", "Pod", pod.name, grace=0)
            elif not pod.deleting and pod.owner_name not in self.obs.pytorchjobs:
                # An orphan (its job is already gone): the GC would get it, we are quicker.
                self.delete("v1", "Pod", pod.name)
        return clean

    def _start_attempt(self, name: str, rec: AttemptStatus) -> None:
        ckpt = self.obs.checkpoint
        if ckpt is None and self.obs.storage_error and self.status.checkpoint is not None:
            # S3 unreadable right now: record the newest commit we know of, not "none" (the
            # trainer finds the real one itself when it starts).
            known = self.status.checkpoint
            ckpt = Checkpoint(step=known.step, uri=known.uri)
        if ckpt is not None:
            self.status.resume_from = CheckpointStatus(step=ckpt.step, uri=ckpt.uri)
            rec.resume_from_step = ckpt.step
        else:
            self.status.resume_from = None
            rec.resume_from_step = None
        cfg = stages.train_stage(self.spec, self.run.name, self.status.attempt, self.run.namespace)
        if self._exclusions_on():
            self._bound_exclusions()  # maxExcludedNodes may have been lowered since
        avoid = [e.node for e in self._excluded_nodes()]
        self.create(
            pytorchjob.training_job(
                self.spec,
                self.run.ref,
                cfg,
                resume_step=ckpt.step if ckpt else None,
                resume_uri=ckpt.uri if ckpt else None,
                exclude_nodes=avoid,
            )
        )
        rec.start_time = self.now
        rec.running_since = rec.last_step = rec.last_step_time = None
        self.status.children.train = name
        frm = (
            f"resuming from step {ckpt.step} ({ckpt.uri})"
            if ckpt
            else "starting from the base model"
        )
        msg = f"attempt {self.status.attempt} of {self.spec.resiliency.max_attempts}: {frm}"
        self.status.message = msg
        self.condition(ConditionType.TRAINING, "True", "AttemptRunning", msg)
        avoiding = f"; avoiding node(s) {', '.join(avoid)} (status.excludedNodes)" if avoid else ""
        self.event("Normal", "AttemptStarted", f"created PyTorchJob {name}; {frm}{avoiding}")

    def training(self) -> None:
        if self.status.attempt < 1:
            self.status.attempt = 1
        self._refresh_progress()
        n = self.status.attempt
        name = meta.child_name(self.run.name, "train", n)
        rec = self._attempt_record()
        ptj = self.obs.pytorchjobs.get(name)
        if ptj is None:
            if self.status.children.train == name:
                self._end_attempt(
                    name,
                    cond.JOB_DELETED,
                    f"PyTorchJob {name} disappeared (deleted outside the operator)",
                )
                return
            if self._teardown(keep=None):
                self._start_attempt(name, rec)
            else:
                self.status.message = (
                    f"waiting for the previous attempt to be gone before attempt {n}"
                )
            return
        self._teardown(keep=name)
        if self.status.children.train != name:
            # Created by a previous operator run that crashed before recording it.
            self.status.children.train = name
            rec.start_time = rec.start_time or ptj.created or self.now
        if ptj.condition == "Succeeded" and not ptj.deleting:
            rec.end_time, rec.reason, rec.message = self.now, cond.COMPLETED, f"{name} succeeded"
            self.condition(ConditionType.TRAINING, "False", cond.COMPLETED, f"{name} succeeded")
            self.transition(Phase.CONVERTING, f"training finished ({name}); exporting")
            return
        failure = self._failure_of(name, ptj) or self._track_progress(name, rec)
        if failure is not None:
            self._end_attempt(name, *failure)

    def _refresh_progress(self) -> None:
        ckpt = self.obs.checkpoint
        if ckpt is not None:
            cur = self.status.checkpoint
            if cur is None or cur.step != ckpt.step or cur.uri != ckpt.uri:
                self.status.checkpoint = CheckpointStatus(step=ckpt.step, uri=ckpt.uri)
        prog = self.obs.progress
        if prog is None:
            return
        max_steps = prog.max_steps or self.spec.max_steps()
        eta: datetime | None = None
        tokens_per_step = self.spec.training.global_batch_size * self.spec.data.block_size
        if prog.tokens_per_sec and prog.tokens_per_sec > 0 and prog.updated_at is not None:
            remaining = max(max_steps - prog.step, 0) * tokens_per_step / prog.tokens_per_sec
            eta = (prog.updated_at + timedelta(seconds=remaining)).replace(microsecond=0)
        self.status.progress = ProgressStatus(
            step=prog.step,
            max_steps=max_steps,
            step_of_max=f"{prog.step}/{max_steps}",
            loss=None if prog.loss is None else round(prog.loss, 4),
            tokens_per_sec=None if prog.tokens_per_sec is None else round(prog.tokens_per_sec, 1),
            mfu_percent=None if prog.mfu is None else round(prog.mfu * 100, 2),
            lr=prog.lr,
            eta=eta,
            updated_at=prog.updated_at.replace(microsecond=0) if prog.updated_at else None,
        )

    # -- suspend / resume ------------------------------------------------------------------

    def _stop_children(self) -> bool:
        """Delete the running children of every stage; True when none is left running."""
        clean = True
        for name, job in sorted(self.obs.jobs.items()):
            if job.complete or job.failed:
                continue
            clean = False
            if not job.deleting:
                self.delete("batch/v1", "Job", name)
        for name, ptj in sorted(self.obs.pytorchjobs.items()):
            if ptj.condition in ("Succeeded", "Failed"):
                continue
            clean = False
            if not ptj.deleting:
                self.delete("kubeflow.org/v1", "PyTorchJob", name)
        for pod in self.obs.training_pods():
            if pod.node_name and self._node_gone_or_not_ready(pod.node_name):
                self.delete("v1", "Pod", pod.name, grace=0)
        return clean

    def suspend(self) -> None:
        self.status.suspended_phase = self.status.phase
        for component in ("tokenize", "weights", "preflight", "export"):
            setattr(self.status.children, component, None)
        self.status.children.train = None
        self._stop_children()
        self.condition(ConditionType.SUSPENDED, "True", "SuspendRequested", "spec.suspend is true")
        if self.status.phase == Phase.TRAINING:
            self.condition(ConditionType.TRAINING, "False", cond.SUSPENDED, "suspended")
        self.transition(
            Phase.SUSPENDED, "spec.suspend is true: stopped the running stage; checkpoints are kept"
        )

    def suspended(self) -> None:
        if self.spec.suspend:
            self._stop_children()
            return
        back = self.status.suspended_phase or Phase.PENDING
        if back in (Phase.SUSPENDED, *TERMINAL_PHASES):
            back = Phase.PENDING
        self.status.suspended_phase = None
        self.condition(ConditionType.SUSPENDED, "False", "Resumed", "spec.suspend is false")
        self.transition(back, f"resumed; continuing with {back.value}")


def cluster_planner(spec: ContinualPretrainSpec) -> PlanSummary:
    """The API's planner in cluster mode (local paths are errors there). Raises the
    planner's PlanError (a ValueError naming every field at fault)."""
    return PlanSummary.model_validate(api_planner.plan(spec, mode="cluster").summary())


def decide(
    run: RunMeta,
    spec_raw: Mapping[str, Any],
    status_raw: Mapping[str, Any] | None,
    observed: Observed,
    now: datetime,
    *,
    planner: Planner | None = None,
) -> Decision:
    """The next status and the actions that get the cluster there."""
    status = load_status(status_raw)
    before = dump_status(status) if status_raw else {}
    if status.phase in TERMINAL_PHASES:
        return Decision(status=dump_status(status), actions=[], changed=False)
    status = copy.deepcopy(status)
    try:
        spec = ContinualPretrainSpec.model_validate(dict(spec_raw))
    except ValidationError as err:
        return _invalid(run, status, format_validation_error(err), now, before)
    rec = _Reconcile(run, spec, status, observed, now, planner or cluster_planner)
    for _ in range(MAX_TRANSITIONS):
        phase = rec.status.phase
        rec.step()
        if rec.status.phase == phase or rec.created or rec.status.phase in TERMINAL_PHASES:
            break
    rec.status.observed_generation = run.generation
    cond.set_ready(rec.status, now=rec.now, generation=run.generation)
    after = dump_status(rec.status)
    return Decision(status=after, actions=rec.actions, changed=after != before)


def _invalid(
    run: RunMeta,
    status: ContinualPretrainStatus,
    message: str,
    now: datetime,
    before: dict[str, Any],
) -> Decision:
    """A spec the models reject (the CRD should have caught most of it): Failed, a condition
    naming the fields, one Warning event, and no children."""
    now = now.replace(microsecond=0)
    actions: list[Action] = []
    old = status.phase
    marks: list[tuple[ConditionType, cond.Status]] = [
        (ConditionType.PLANNED, "False"),
        (ConditionType.FAILED, "True"),
        (ConditionType.SUCCEEDED, "False"),
    ]
    for type_, value in marks:
        cond.set_condition(
            status,
            type_,
            value,
            cond.INVALID_SPEC,
            message,
            now=now,
            generation=run.generation,
        )
    status.phase = Phase.FAILED
    status.message = f"{cond.INVALID_SPEC}: {message}"
    status.start_time = status.start_time or now
    status.completion_time = now
    status.observed_generation = run.generation
    cond.set_ready(status, now=now, generation=run.generation)
    reason = cond.transition_reason(old.value, Phase.FAILED.value)
    actions.append(EmitEvent("Warning", reason, f"{old.value} → Failed: {message}"))
    after = dump_status(status)
    return Decision(status=after, actions=actions, changed=after != before)
