"""What goes into and comes out of a decision: the run's metadata, the decision itself, and
the status in its wire form and back (an unreadable status restarts bookkeeping), plus the
one-line form of validation errors used in conditions and events."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from cpt_operator.api.models import (
    ContinualPretrainSpec,
    ContinualPretrainStatus,
    PlanSummary,
)
from cpt_operator.api.planner import validation_issues
from cpt_operator.builders.jobs import RunRef
from cpt_operator.reconcile.actions import Action

Planner = Callable[[ContinualPretrainSpec], PlanSummary]


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
    """Our own status, read back. A part edited by hand into something unreadable is dropped
    (that part's bookkeeping restarts), the rest is kept: a bad condition must not reset the
    attempt counter (reconcile/trust.py); an unknown phase becomes Pending."""
    if not raw:
        return ContinualPretrainStatus()
    data = dict(raw)
    for _ in range(len(data) + 1):
        try:
            return ContinualPretrainStatus.model_validate(data)
        except ValidationError as err:
            bad = {e["loc"][0] for e in err.errors() if e.get("loc")}
            if not bad & data.keys():
                break
            for key in bad:
                data.pop(str(key), None)
    return ContinualPretrainStatus()


def format_validation_error(err: ValidationError, prefix: str = "spec") -> str:
    """One `spec.<path>: message` per problem, e.g. `spec.training.env[0].name: ...`: the
    same lines `cpt plan` prints (api/planner.py, validation_issues)."""
    return "; ".join(str(issue) for issue in validation_issues(err, prefix))
