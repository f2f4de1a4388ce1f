"""The run's state machine: (spec, status, observed children, now) → (new status, actions).

Pure and level-based: the same inputs always give the same answer, whatever happened before.
The handler executes the actions (create-if-absent, delete, events) and only then patches the
status, so a crash between the two is repaired by the next reconcile: creates are idempotent
(deterministic names), and a training child that vanished without the status knowing why is
treated as a failed attempt.

    Pending → Planning → [Preflight] → Tokenizing → [PreparingWeights (nxd)] → [Precompiling]
            → Training (n) → Converting → Succeeded | Failed   Suspended via spec.suspend

A child Kueue holds (suspended) keeps its phase with condition Queued; a preempted attempt
(SIGTERM with a committed checkpoint) is not counted against maxAttempts; past
activeDeadlineSeconds the run stops and fails DeadlineExceeded (lifecycle.py).

Terminal phases are sticky. The attempt counter lives in the run's status; attempt n+1 is only
created once nothing of attempt n is left (its pods could otherwise still hold the nodes or,
on a real cluster, still write to the checkpoint root). The new attempt resumes from the newest
committed checkpoint: the trainer finds it; the operator only records what it expects.

The phase rules read top to bottom in ``_Reconcile`` below; the state and helpers they share
are in base.py, the training phase's recovery helpers in recovery.py, and the status's wire
form with the run's metadata in status.py (all re-exported here).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from cpt_operator.api import planner as api_planner
from cpt_operator.api.models import (
    TERMINAL_PHASES,
    ConditionType,
    ContinualPretrainSpec,
    ContinualPretrainStatus,
    Phase,
    PlanSummary,
    parse_spec,
)
from cpt_operator.builders import jobs, meta, pytorchjob, stages
from cpt_operator.reconcile import conditions as cond
from cpt_operator.reconcile import trust
from cpt_operator.reconcile.actions import Action, EmitEvent
from cpt_operator.reconcile.lifecycle import Lifecycle
from cpt_operator.reconcile.observe import Observed
from cpt_operator.reconcile.recovery import DEVICE_FAULT_MARKER
from cpt_operator.reconcile.status import (
    Decision,
    Planner,
    RunMeta,
    dump_status,
    format_validation_error,
    load_status,
)

__all__ = [
    "DEVICE_FAULT_MARKER",
    "MAX_TRANSITIONS",
    "Decision",
    "Planner",
    "RunMeta",
    "cluster_planner",
    "decide",
    "dump_status",
    "format_validation_error",
    "load_status",
]

MAX_TRANSITIONS = 10
"""Instant transitions chained in one reconcile (Pending → Planning → first stage)."""


class _Reconcile(Lifecycle):
    """One decision in progress: the phase rules, top to bottom (the shared state and helpers
    are ReconcileBase's in base.py, the training recovery helpers Recovery's in recovery.py,
    the preflight record, precompile phase and deadline Lifecycle's in lifecycle.py)."""

    # -- the state machine -----------------------------------------------------------------

    def step(self) -> None:
        phase = self.status.phase
        if phase in TERMINAL_PHASES:
            return
        if self.spec.suspend and phase != Phase.SUSPENDED:
            self.suspend()
            return
        past = self.status.deadline_exceeded_at is None and self._past_deadline()
        if phase != Phase.SUSPENDED and past:
            self.deadline_exceeded()
            return
        handler = {
            Phase.PENDING: self.pending,
            Phase.PLANNING: self.planning,
            Phase.PREFLIGHT: self.preflight,
            Phase.TOKENIZING: self.tokenizing,
            Phase.PREPARING_WEIGHTS: self.preparing_weights,
            Phase.PRECOMPILING: self.precompiling,
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
                on = self._exclusions_on()
                avoid = [e.node for e in self.status.excluded_nodes] if on else []
                self.create(pytorchjob.preflight_job(self.spec, self.run.ref, cfg, avoid))
                self.status.children.preflight = name
                self.status.message = f"preflight check {name} running"
            return
        if self._queued_stage(name, ptj):  # held by Kueue: condition Queued, no pending clock
            return
        if ptj.condition in ("Succeeded", "Failed", "Restarting"):
            self._record_preflight()
        if ptj.condition == "Succeeded":
            self.condition(ConditionType.PREFLIGHT_PASSED, "True", "PreflightSucceeded", name)
            self.transition(Phase.TOKENIZING, "preflight passed; tokenizing")
            return
        if ptj.condition in ("Failed", "Restarting"):
            if self._exclude_preflight_nodes(name):
                return
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
        waited = self._queue_hold("Job", "batch/job", name, job.uid, job.suspended)
        self.status.queued_seconds += waited or 0  # excluded from the deadline
        if job.suspended:  # held by Kueue: condition Queued, no pending clock
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
            next_phase=Phase.PRECOMPILING if self.spec.runtime.precompile else Phase.TRAINING,
            running_msg=f"converting {cfg.model_uri} to the NxD layout in {cfg.output_uri}",
            done_msg=f"NxD weights in {cfg.output_uri}",
        )

    def converting(self) -> None:
        self._refresh_progress()
        cfg = stages.export_stage(self.spec, self.run.name, self.run.namespace)
        export = self.obs.jobs.get(meta.child_name(self.run.name, "export"))
        done = export is not None and export.complete and not export.deleting
        if self.status.deadline_exceeded_at is not None and done:
            # Exported after the deadline (exportOnDeadline): the run still failed on it.
            kept = self.status.checkpoint
            step = f"step {kept.step}" if kept else "the newest checkpoint"
            self.status.output_uri = cfg.output_uri
            self.condition(ConditionType.EXPORTED, "True", "Completed", cfg.output_uri)
            self.fail(
                cond.DEADLINE_EXCEEDED,
                f"spec.resiliency.activeDeadlineSeconds "
                f"({self.spec.resiliency.active_deadline_seconds}s) reached; the model of "
                f"{step} is exported to {cfg.output_uri} (exportOnDeadline)",
            )
            return
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

    # -- training -------------------------------------------------------------------------

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
        if self._queued(name, ptj, rec):
            return
        failure = self._failure_of(name, ptj) or self._track_progress(name, rec)
        if failure is not None:
            self._end_attempt(name, *failure)

    # -- suspend / resume ------------------------------------------------------------------

    def suspend(self) -> None:
        self.status.suspended_phase = self.status.phase
        self.status.suspended_since = self.now
        for component in ("tokenize", "weights", "preflight", "precompile", "export"):
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
        if self.status.suspended_since is not None:
            away = (self.now - self.status.suspended_since).total_seconds()
            self.status.suspended_seconds += max(int(away), 0)
            self.status.suspended_since = None
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
    reopen = _export_after_deadline(status, spec_raw)
    if status.phase in TERMINAL_PHASES and not reopen:
        return Decision(status=dump_status(status), actions=[], changed=False)
    status = copy.deepcopy(status)
    try:
        spec = parse_spec(dict(spec_raw))
    except ValidationError as err:
        return _invalid(run, status, format_validation_error(err), now, before)
    rec = _Reconcile(run, spec, status, observed, now, planner or cluster_planner)
    if repaired := trust.bound_attempt(status, spec, observed):
        rec.event("Warning", trust.STATUS_REPAIRED, repaired)
    if reopen:
        rec.status.completion_time = None
        rec.transition(Phase.CONVERTING, "exportOnDeadline set: exporting the newest checkpoint")
    for _ in range(MAX_TRANSITIONS):
        phase = rec.status.phase
        rec.step()
        if rec.status.phase == phase or rec.created or rec.status.phase in TERMINAL_PHASES:
            break
    rec.status.observed_generation = run.generation
    cond.set_ready(rec.status, now=rec.now, generation=run.generation)
    after = dump_status(rec.status)
    return Decision(status=after, actions=rec.actions, changed=after != before)


def _export_after_deadline(status: ContinualPretrainStatus, spec_raw: Mapping[str, Any]) -> bool:
    """A run that failed on its deadline, exported nothing, and now asks for the export
    (spec.resiliency.exportOnDeadline set afterwards): the one way out of Failed."""
    resiliency = spec_raw.get("resiliency") or {}
    return (
        status.phase == Phase.FAILED
        and status.deadline_exceeded_at is not None
        and status.checkpoint is not None
        and status.output_uri is None
        and bool(resiliency.get("exportOnDeadline"))
    )


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
