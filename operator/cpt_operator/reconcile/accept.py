"""An update is validated like a create before it takes effect; the operator acts only on the
last accepted spec.

The CRD's schema and CEL rules refuse what they can express, on create and on update alike.
What they cannot (the planner's arithmetic, the cross-run storage check, the cluster facts:
Secrets, Pod Security, the API server's pod validation through a server-side dry run, the
system priority classes) is checked here, by the operator, for every new generation before
it is acted on. The run then goes on with the last accepted spec: a refused generation is
reported with the condition SpecAccepted=False (its reason names the class, its message the
fields) and one Warning Event `SpecRejected`, and changes nothing else: no child is created
or changed from it, no attempt is used up.

Why no validating webhook: the same checks would run twice (the webhook cannot replace the
operator's own, since a webhook that is down or bypassed with `failurePolicy: Ignore` lets
anything through), and a webhook adds a TLS certificate to issue and rotate and a Service the
API server must reach before any run can be created or edited. With `failurePolicy: Fail` an
operator outage blocks every edit, including `suspend: true` in an emergency; with `Ignore` it
guarantees nothing. The CEL rules give `kubectl apply` its immediate answer for everything a
schema can say; the rest answers within a reconcile (docs/api.md, Updates).

Where the accepted spec is kept: `status.acceptedSpec` holds the accepted generation, a
sha256 digest of the whole accepted spec and a copy of its mutable sections only (runtime,
resiliency, output, suspend; model, data, training and checkpoints are immutable once
created, so they are the spec's own). Those sections hold no secret value (Secrets are
referenced by name) and are bounded (ACCEPTED_SPEC_MAX_BYTES). The status can be edited by
hand, so the copy is not trusted either: it must match its digest, and this operator process
checks it once itself before acting on it, after a restart too (the models, the planner, the
policy, the shared prefixes; not the cluster facts, so a Secret deleted since does not stop the
operator from looking after a running attempt).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from cpt_operator.api.models import (
    ACCEPTED_SPEC_MAX_BYTES,
    AcceptedSpec,
    ConditionType,
    ContinualPretrainStatus,
    Phase,
)
from cpt_operator.reconcile import conditions as cond
from cpt_operator.reconcile.actions import EmitEvent
from cpt_operator.reconcile.admission import Blocker

MUTABLE = ("runtime", "resiliency", "output", "suspend")
"""The spec sections the CRD lets change after creation (the others are `self == oldSelf`)."""
REJUDGE_SECONDS = 30.0
"""A refused generation is checked again this often (a missing Secret may appear)."""
MEMORY_ENTRIES = 8
SPEC_REJECTED = "SpecRejected"
SPEC_ACCEPTED = "SpecAccepted"
SPEC_TOO_LARGE = "SpecTooLarge"
PLANNING_PHASES = {Phase.PENDING, Phase.PLANNING}

Checker = Callable[[Mapping[str, Any], bool], list[Blocker]]
"""Every problem of a spec (its wire form): the models, the planner, the policy, the shared
prefixes and, when the flag is true, the cluster facts (Secrets, Pod Security, dry run)."""


def digest(spec: Mapping[str, Any]) -> str:
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def record_of(spec: Mapping[str, Any], generation: int) -> AcceptedSpec:
    return AcceptedSpec(
        generation=generation,
        digest=digest(spec),
        spec={k: spec[k] for k in MUTABLE if k in spec},
    )


def view(current: Mapping[str, Any], record: AcceptedSpec) -> dict[str, Any]:
    """The accepted spec: the current immutable sections with the recorded mutable ones."""
    out = {k: v for k, v in current.items() if k not in MUTABLE}
    out.update({k: v for k, v in record.spec.items() if k in MUTABLE})
    return out


def too_large(spec: Mapping[str, Any]) -> Blocker | None:
    size = len(json.dumps({k: spec.get(k) for k in MUTABLE}, default=str))
    if size <= ACCEPTED_SPEC_MAX_BYTES:
        return None
    return Blocker(
        SPEC_TOO_LARGE,
        "spec.runtime",
        f"spec.runtime, resiliency and output: {size} bytes of JSON, more than the "
        f"{ACCEPTED_SPEC_MAX_BYTES} the operator keeps as the accepted spec "
        "(status.acceptedSpec); shorten spec.runtime.affinity or the node selectors",
    )


@dataclass
class Memory:
    """What this operator process has checked for one run: digest → (problems, when)."""

    judged: dict[str, tuple[tuple[Blocker, ...], float]] = field(default_factory=dict)

    def problems(
        self, spec: Mapping[str, Any], check: Checker, *, cluster: bool = True
    ) -> tuple[Blocker, ...]:
        """The problems of `spec`, checked at most once per digest (a refused one again after
        REJUDGE_SECONDS). `cluster`: with the cluster facts."""
        key, now = digest(spec) + ("" if cluster else ":spec"), time.monotonic()
        known = self.judged.get(key)
        if known is not None and (not known[0] or now - known[1] < REJUDGE_SECONDS):
            return known[0]
        big = too_large(spec)
        found = (big,) if big else tuple(check(spec, cluster))
        self.judged[key] = (found, now)
        while len(self.judged) > MEMORY_ENTRIES:
            self.judged.pop(next(iter(self.judged)))
        return found

    def remember_ok(self, spec: Mapping[str, Any]) -> None:
        now = time.monotonic()
        self.judged[digest(spec)] = self.judged[digest(spec) + ":spec"] = ((), now)


@dataclass(frozen=True)
class Verdict:
    """What to act on in this pass, and what to report about the current generation."""

    spec: dict[str, Any] | None
    """The spec to act on; None when no spec is acceptable (act on nothing)."""
    record: AcceptedSpec | None
    rejected: tuple[Blocker, ...] = ()
    first: bool = False
    """Never accepted and still planning: the planning phase judges it (and fails the run
    with the reason, before any child exists)."""
    accepted_now: bool = False


def load_record(status: Mapping[str, Any]) -> AcceptedSpec | None:
    raw = status.get("acceptedSpec")
    if not isinstance(raw, Mapping):
        return None
    try:
        return AcceptedSpec.model_validate(dict(raw))
    except ValidationError:
        return None


def choose(body: Mapping[str, Any], memory: Memory, check: Checker) -> Verdict:
    """The spec this pass acts on (see the module docstring)."""
    current = dict(body.get("spec") or {})
    generation = int((body.get("metadata") or {}).get("generation") or 1)
    status = body.get("status") or {}
    record = load_record(status)
    if record is not None:
        accepted = view(current, record)
        # Edited by hand: judged afresh below. The cluster facts are left out here: a Secret
        # deleted since must not stop the operator from looking after a running attempt.
        if record.digest != digest(accepted) or memory.problems(accepted, check, cluster=False):
            record = None
    if record is None:
        if status.get("phase") in (None, "", *PLANNING_PHASES):
            return Verdict(current, None, first=True)
        problems = memory.problems(current, check)
        if problems:
            return Verdict(None, None, problems)
        return Verdict(current, record_of(current, generation), accepted_now=True)
    accepted = view(current, record)
    if digest(current) == record.digest:
        if record.generation != generation:  # the same spec again (e.g. an edit undone)
            record = record_of(current, generation)
        return Verdict(current, record)
    problems = memory.problems(current, check)
    if problems:
        return Verdict(accepted, record, problems)
    return Verdict(current, record_of(current, generation), accepted_now=True)


def report(
    status: ContinualPretrainStatus,
    verdict: Verdict,
    generation: int,
    now: datetime,
    spec: Mapping[str, Any],
) -> list[EmitEvent]:
    """Record the verdict in `status` (acceptedSpec, condition SpecAccepted); the Events to
    post (one per refused or accepted generation, not one per pass)."""
    events: list[EmitEvent] = []
    old = cond.get(status, ConditionType.SPEC_ACCEPTED)
    if verdict.first:
        if status.phase not in (*PLANNING_PHASES, Phase.FAILED, Phase.SUSPENDED):
            status.accepted_spec = record_of(spec, generation)
            _mark(status, "True", "Accepted", f"generation {generation} accepted", now, generation)
        return events
    if verdict.rejected:
        first = verdict.rejected[0]
        keeps = (
            f"the run goes on with generation {verdict.record.generation}"
            if verdict.record
            else "no generation of this spec was accepted yet: nothing is created until it is fixed"
        )
        detail = "; ".join(b.message for b in verdict.rejected)
        message = f"generation {generation} is refused, {keeps}: {detail}"
        if old is None or old.message != message or old.observed_generation != generation:
            events.append(EmitEvent("Warning", SPEC_REJECTED, message))
        _mark(status, "False", first.reason, message, now, generation)
        return events
    if verdict.record is not None:
        status.accepted_spec = verdict.record
        message = f"generation {verdict.record.generation} accepted"
        if verdict.accepted_now and (old is None or old.message != message):
            events.append(EmitEvent("Normal", SPEC_ACCEPTED, message))
        _mark(status, "True", "Accepted", message, now, generation)
    return events


def _mark(
    status: ContinualPretrainStatus,
    value: cond.Status,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> None:
    cond.set_condition(
        status,
        ConditionType.SPEC_ACCEPTED,
        value,
        reason,
        message,
        now=now,
        generation=generation,
    )
