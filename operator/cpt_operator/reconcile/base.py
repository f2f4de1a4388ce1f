"""The decision in progress, shared by the phase rules (decide.py) and the training
recovery rules (recovery.py): the mutable status copy, the actions so far, and the small
helpers every rule uses (events, conditions, transitions, creates, deletes, failing)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from cpt_operator.api.models import (
    ConditionType,
    ContinualPretrainSpec,
    ContinualPretrainStatus,
    Phase,
)
from cpt_operator.builders import stages
from cpt_operator.reconcile import conditions as cond
from cpt_operator.reconcile.actions import Action, CreateChild, DeleteChild, EmitEvent
from cpt_operator.reconcile.observe import Observed
from cpt_operator.reconcile.status import Planner, RunMeta


class ReconcileBase:
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
