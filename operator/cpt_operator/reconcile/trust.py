"""The status is derived, not trusted; and the documented way back from Failed.

Users who may edit a run's status (the status subresource needs its own RBAC, but users get
it) could otherwise steer the operator: a lower attempt number buys attempts beyond
maxAttempts, a huge one builds a child name the API server refuses, and a terminal phase
written by hand stops the operator from looking after a training that still runs. So the
operator reads back only what its children and S3 confirm:

* `bound_attempt`: status.attempt is raised to the newest attempt a training child or
  progress.json (written by the trainer) shows, and one beyond maxAttempts that no child
  confirms is brought back to maxAttempts. The CRD bounds it too (`maximum: 100`), so a child
  name never exceeds 63 characters.
* `repair_terminal`: a Succeeded or Failed phase the operator did not write, while one of the
  run's children still runs, is replaced by the phase that child belongs to.

`revive` is the other direction, on purpose: a Failed run continues after an accepted edit
(reconcile/accept.py) when the edit can fix what failed it: MaxAttemptsExceeded and a higher
maxAttempts (the next attempt resumes from the newest checkpoint), or a failure before or
while creating a child (planned again with the new spec). Anything else stays Failed and says
so: delete and re-create the run (tokenized data and checkpoints in S3 are reused).
"""

from __future__ import annotations

from datetime import datetime

from cpt_operator.api.models import (
    MAX_ATTEMPTS_LIMIT,
    ConditionType,
    ContinualPretrainSpec,
    ContinualPretrainStatus,
    Phase,
)
from cpt_operator.builders import meta
from cpt_operator.reconcile import conditions as cond
from cpt_operator.reconcile.observe import Observed

STATUS_REPAIRED = "StatusRepaired"
REVIVED = "Revived"
NOT_REVIVED = "NotRevived"

_STAGE_PHASES: tuple[tuple[meta.Component, Phase], ...] = (
    ("export", Phase.CONVERTING),
    ("weights", Phase.PREPARING_WEIGHTS),
    ("tokenize", Phase.TOKENIZING),
)


def bound_attempt(
    status: ContinualPretrainStatus, spec: ContinualPretrainSpec, observed: Observed
) -> str | None:
    """Bring status.attempt back to what the children and S3 confirm; why, when it moved."""
    confirmed = [p.attempt for p in observed.pytorchjobs.values() if p.attempt]
    if observed.progress is not None and observed.progress.attempt:
        confirmed.append(observed.progress.attempt)
    newest = min(max(confirmed, default=0), MAX_ATTEMPTS_LIMIT)
    # Preempted attempts do not count against maxAttempts, so each one raises the bound; the
    # child-name bound (MAX_ATTEMPTS_LIMIT) holds whatever the status claims.
    preempted = sum(1 for a in status.attempts if a.reason == cond.PREEMPTED)
    limit = spec.resiliency.max_attempts
    bound = min(limit + preempted, MAX_ATTEMPTS_LIMIT)
    n = status.attempt
    if n < newest:
        status.attempt = newest
        return f"status.attempt {n} is behind attempt {newest} of the run's children/progress"
    if n > bound and n not in confirmed:
        status.attempt = newest or bound
        extra = f" plus {preempted} preempted attempts" if preempted else ""
        return (
            f"status.attempt {n} exceeds spec.resiliency.maxAttempts ({limit}){extra} and no "
            f"child confirms it; continuing as attempt {status.attempt}"
        )
    return None


def repair_terminal(status: ContinualPretrainStatus, observed: Observed, run: str) -> str | None:
    """A terminal phase written by someone else while a child still runs: back to that
    child's phase (the operator's own terminal writes come after stopping its children)."""
    phase: Phase | None = None
    for name, ptj in sorted(observed.pytorchjobs.items()):
        if ptj.deleting or ptj.condition in ("Succeeded", "Failed"):
            continue
        if ptj.attempt:
            phase = Phase.TRAINING
            status.attempt = min(ptj.attempt, MAX_ATTEMPTS_LIMIT)
            status.children.train = name
            break
        if name == meta.child_name(run, "preflight"):
            phase = Phase.PREFLIGHT
    if phase is None:
        for component, stage_phase in _STAGE_PHASES:
            job = observed.jobs.get(meta.child_name(run, component))
            if job is not None and not (job.complete or job.failed or job.deleting):
                phase = stage_phase
                break
    if phase is None:
        return None
    old = status.phase
    status.phase, status.completion_time = phase, None
    why = (
        f"status.phase {old.value} was not written by the operator while a child of the run "
        f"still runs; back to {phase.value}"
    )
    status.message = f"{STATUS_REPAIRED}: {why}"
    return why


def revive(
    status: ContinualPretrainStatus,
    spec: ContinualPretrainSpec,
    generation: int,
    now: datetime,
) -> tuple[bool, str]:
    """Continue a Failed run after an accepted edit, when the edit can fix the failure;
    (revived, why)."""
    failed = cond.get(status, ConditionType.FAILED)
    planned = cond.get(status, ConditionType.PLANNED)
    reason = failed.reason if failed else ""
    limit = spec.resiliency.max_attempts
    if reason == cond.MAX_ATTEMPTS_EXCEEDED:
        if limit <= status.attempt:
            return False, (
                f"the run stays Failed: {status.attempt} of {limit} attempts are used; raise "
                f"spec.resiliency.maxAttempts above {status.attempt} to continue it"
            )
        status.attempt += 1
        status.children.train = None
        why = f"spec.resiliency.maxAttempts is {limit}: continuing with attempt {status.attempt}"
    elif (
        reason == cond.DEADLINE_EXCEEDED
        and spec.resiliency.export_on_deadline
        and status.checkpoint is not None
        and status.output_uri is None
    ):
        why = "spec.resiliency.exportOnDeadline is set: exporting the newest checkpoint"
        status.phase, status.completion_time = Phase.CONVERTING, None
        status.message = f"{REVIVED}: {why}"
        cond.set_condition(
            status, ConditionType.FAILED, "False", REVIVED, why, now=now, generation=generation
        )
        return True, why
    elif planned is None or planned.status == "False" or reason == cond.INVALID_SPEC:
        why = f"generation {generation} is accepted: planning the run again"
    else:
        return False, (
            f"the run stays Failed ({reason}): an edit continues a run that failed with "
            "MaxAttemptsExceeded, or before its children could be created; delete and "
            "re-create it (its tokenized data and checkpoints in S3 are reused)"
        )
    status.phase, status.completion_time = Phase.PENDING, None
    status.message = f"{REVIVED}: {why}"
    for type_ in (ConditionType.FAILED, ConditionType.SUCCEEDED):
        cond.set_condition(status, type_, "False", REVIVED, why, now=now, generation=generation)
    return True, why
