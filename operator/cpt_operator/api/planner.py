"""The planner: from a ContinualPretrain spec to a checked, costed plan. Pure.

It answers, before any pod exists: does this layout work (world size, data parallel degree,
gradient accumulation / pipeline microbatches, heads vs tensor parallel, layers vs pipeline),
does it fit in device memory, and roughly how long and how much. Every problem is collected
(not first-only) as ``spec.<field path>: message`` with the allowed values or a fix.

The formulas are documented in docs/planner.md; the throughput model is calibrated on the
published rows and our own GPU runs in ``data/calibration.yaml`` (see ``calibration_report``).

This module holds the entry points; the rules live in plan_checks, the memory model in
plan_memory, the throughput model in plan_throughput, the table in plan_render and the result
types in plan_types. Every public name of those is re-exported here, so callers import from
``cpt_operator.api.planner`` only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cpt_operator.api.fields import type_message
from cpt_operator.api.models import (
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    ContinualPretrainSpec,
    FieldErrors,
    parse_spec,
)
from cpt_operator.api.plan_checks import IMAGE_REFERENCE, MEMORY_WARN_FRACTION, Planner
from cpt_operator.api.plan_memory import (
    FUSED_ATTENTION,
    activation_bytes_per_layer,
    memory_estimate,
    stage_layers,
)
from cpt_operator.api.plan_render import calibration_markdown, render_text
from cpt_operator.api.plan_throughput import (
    MEASURED_BY_US,
    RECOMPUTE_POLICIES,
    Anchor,
    EfficiencyModel,
    anchors,
    calibration_report,
    device_class,
    efficiency_model,
    fit_efficiency,
    pipeline_efficiency,
    recompute_efficiency,
    recompute_flops_per_token,
    throughput_estimate,
    tp_slice_efficiency,
)
from cpt_operator.api.plan_types import (
    Estimate,
    MemoryEstimate,
    Mode,
    Plan,
    PlanError,
    PlanIssue,
    known_models,
    price_per_hour,
    price_table,
)
from cpt_operator.api.podsecurity import required_level
from cpt_operator.api.wire import load_documents

__all__ = [
    "FUSED_ATTENTION",
    "IMAGE_REFERENCE",
    "MEASURED_BY_US",
    "MEMORY_WARN_FRACTION",
    "RECOMPUTE_POLICIES",
    "Anchor",
    "EfficiencyModel",
    "Estimate",
    "MemoryEstimate",
    "Mode",
    "Plan",
    "PlanError",
    "PlanIssue",
    "activation_bytes_per_layer",
    "anchors",
    "calibration_markdown",
    "calibration_report",
    "device_class",
    "efficiency_model",
    "fit_efficiency",
    "known_models",
    "load_run",
    "memory_estimate",
    "pipeline_efficiency",
    "plan",
    "plan_object",
    "price_per_hour",
    "price_table",
    "recompute_efficiency",
    "recompute_flops_per_token",
    "render_text",
    "stage_layers",
    "throughput_estimate",
    "tp_slice_efficiency",
    "validation_issues",
    "warm",
]


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def load_run(path: str | Path) -> dict[str, Any]:
    """Read run.yaml (one ContinualPretrain document) under the API server's rules for the
    text (api/wire.py: UTF-8, no duplicate keys, bounded aliases)."""
    docs = [d for d in load_documents(path) if d is not None]
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise ValueError(f"{path}: expected exactly one ContinualPretrain document")
    return docs[0]


def plan_object(
    obj: Mapping[str, Any], *, mode: Mode | None = None, base_dir: Path | None = None
) -> Plan:
    """Plan a whole object (apiVersion/kind/metadata/spec), as in run.yaml."""
    issues: list[PlanIssue] = []
    if obj.get("apiVersion") != "cpt.dev/v1alpha1":
        issues.append(PlanIssue("apiVersion", "must be cpt.dev/v1alpha1"))
    if obj.get("kind") != "ContinualPretrain":
        issues.append(PlanIssue("kind", "must be ContinualPretrain"))
    issues += _check_name((obj.get("metadata") or {}).get("name"))
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return Plan(mode=mode or "cluster", errors=[*issues, PlanIssue("spec", "is required")])
    result = plan(spec, mode=mode, base_dir=base_dir)
    result.errors[:0] = issues
    return result


def plan(
    spec: ContinualPretrainSpec | Mapping[str, Any],
    *,
    mode: Mode | None = None,
    base_dir: Path | None = None,
) -> Plan:
    """Check and estimate a spec. Never raises for a bad spec: see ``Plan.errors``.

    ``mode`` defaults to ``local`` for instanceType local-cpu, else ``cluster`` (where local
    paths are errors). ``base_dir`` resolves relative local paths (config.json lookup).
    """
    if not isinstance(spec, ContinualPretrainSpec):
        try:
            spec = parse_spec(spec)
        except ValidationError as exc:
            return Plan(mode=mode or "cluster", errors=validation_issues(exc))
    mode = mode or ("local" if spec.training.instance_type == "local-cpu" else "cluster")
    result = Planner(spec, mode, base_dir or Path.cwd()).run()
    if result.ok:
        result.pod_security = required_level(spec)
    return result


def validation_issues(exc: ValidationError, prefix: str = "spec") -> list[PlanIssue]:
    """Pydantic errors as ``spec.<camelCase path>: message`` issues, one per problem."""
    issues: list[PlanIssue] = []
    for err in exc.errors():
        path = prefix
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldErrors):
            for sub, message in cause.problems:
                issues.append(PlanIssue(f"{path}.{sub}" if sub else path, message))
            continue
        message = type_message(err) or err["msg"]
        for noise in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(noise)
        if err["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see docs/api.md)"
        elif err["type"] == "missing":
            message = "is required"
        issues.append(PlanIssue(path, message))
    return issues


def _check_name(name: Any) -> list[PlanIssue]:
    if not isinstance(name, str) or not name:
        return [PlanIssue("metadata.name", "is required")]
    issues = []
    if len(name) > MAX_NAME_LENGTH:
        issues.append(
            PlanIssue(
                "metadata.name",
                f"must be at most {MAX_NAME_LENGTH} characters: child Jobs, pods and Services "
                f"are named after it (got {len(name)})",
            )
        )
    if not re.fullmatch(NAME_PATTERN, name):
        issues.append(
            PlanIssue(
                "metadata.name",
                "must start with a letter and contain only lowercase letters, digits and '-' "
                "(it names Services)",
            )
        )
    return issues


def warm() -> None:
    """Load the data tables and fit the efficiency model now (about 30 ms): the operator calls
    this at startup, so the first run it plans does not pay for it in the middle of a burst of
    new runs, with the event loop blocked (docs/PERFORMANCE.md 5)."""
    known_models()
    price_table()
    efficiency_model()
