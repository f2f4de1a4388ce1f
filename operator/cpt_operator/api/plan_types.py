"""The planner's data tables and result types (Plan, PlanIssue, MemoryEstimate, Estimate).

Split from planner.py so the memory and throughput models and the checks can share them
without importing the checks; ``cpt_operator.api.planner`` re-exports every name here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml

from cpt_operator.api.mixture_plan import SourcePlan
from cpt_operator.api.models import PlanSummary
from cpt_operator.api.podsecurity import PodSecurityNeed
from cpt_training.flops import GIB, InstanceType, ModelShape

Mode = Literal["cluster", "local"]


# ---------------------------------------------------------------------------------------------
# Data tables
# ---------------------------------------------------------------------------------------------


def data_table(name: str) -> Any:
    """A YAML table from cpt_operator/api/data (models, prices, calibration)."""
    text = resources.files("cpt_operator.api.data").joinpath(name).read_text()
    return yaml.safe_load(text)


@cache
def known_models() -> dict[str, dict[str, Any]]:
    """Shapes of base models the planner knows, keyed by lower-case HF id."""
    return {k.lower(): v for k, v in data_table("models.yaml").items()}


@cache
def price_table() -> dict[str, Any]:
    data: dict[str, Any] = data_table("prices.yaml")
    return data


def price_per_hour(instance: str) -> float | None:
    value = price_table()["prices"].get(instance)
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanIssue:
    """One problem (or warning) with the field it is about."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class PlanError(ValueError):
    """The spec cannot run; ``issues`` lists every reason."""

    def __init__(self, issues: list[PlanIssue]) -> None:
        self.issues = issues
        super().__init__("; ".join(str(i) for i in issues))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device for the most loaded pipeline stage."""

    stage: str
    params_per_device: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    reserved: float
    device_bytes: float | None

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.reserved

    @property
    def fraction(self) -> float | None:
        return None if not self.device_bytes else self.total / self.device_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "paramsPerDevice": self.params_per_device,
            "weightsGiB": to_gib(self.weights),
            "gradsGiB": to_gib(self.grads),
            "optimizerGiB": to_gib(self.optimizer),
            "activationsGiB": to_gib(self.activations),
            "reservedGiB": to_gib(self.reserved),
            "totalGiB": to_gib(self.total),
            "deviceGiB": None if self.device_bytes is None else to_gib(self.device_bytes),
        }


@dataclass(frozen=True)
class Estimate:
    step_seconds: float
    tokens_per_sec: float
    mfu: float
    wall_hours: float
    instance_hours: float
    cost_usd: float | None
    price_per_hour: float | None
    basis: str


@dataclass
class Plan:
    mode: Mode
    errors: list[PlanIssue] = field(default_factory=list)
    warnings: list[PlanIssue] = field(default_factory=list)
    backend: Literal["nxd", "native"] | None = None
    instance: InstanceType | None = None
    nodes: int = 0
    processes_per_node: int = 0
    world_size: int = 0
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 0
    kv_size_multiplier: int = 1
    micro_batch_size: int = 1
    grad_accum_steps: int = 0
    seq_len: int = 0
    tokens_per_step: int = 0
    max_steps: int = 0
    shape: ModelShape | None = None
    memory: MemoryEstimate | None = None
    estimate: Estimate | None = None
    pod_security: PodSecurityNeed | None = None
    """The Pod Security level the run's namespace must allow (None for an invalid spec)."""
    mixture: list[SourcePlan] = field(default_factory=list)
    """Tokens and epochs per data source (cpt_operator.api.mixture_plan)."""

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def pipeline_microbatches(self) -> int | None:
        return self.grad_accum_steps if self.pipeline_parallel > 1 else None

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.max_steps

    @property
    def checkpoint_bytes(self) -> float | None:
        """bf16 weights (2 B) + fp32 master and Adam m, v (12 B) per parameter."""
        return None if self.shape is None else 14.0 * self.shape.total_params

    def raise_for_errors(self) -> None:
        if self.errors:
            raise PlanError(self.errors)

    def summary(self) -> dict[str, Any]:
        """The status.plan object (camelCase, JSON-ready). Only for a plan without errors."""
        self.raise_for_errors()
        if not (self.backend and self.instance and self.shape and self.memory):
            raise RuntimeError("a plan without errors has a layout, a shape and a memory figure")
        est = self.estimate
        device = self.instance.device_spec
        summary = PlanSummary(
            backend=self.backend,
            instance_type=self.instance.name,
            nodes=self.nodes,
            processes_per_node=self.processes_per_node,
            world_size=self.world_size,
            data_parallel=self.data_parallel,
            tensor_parallel=self.tensor_parallel,
            pipeline_parallel=self.pipeline_parallel,
            kv_size_multiplier=self.kv_size_multiplier,
            micro_batch_size=self.micro_batch_size,
            grad_accum_steps=self.grad_accum_steps,
            pipeline_microbatches=self.pipeline_microbatches,
            tokens_per_step=self.tokens_per_step,
            max_steps=self.max_steps,
            total_tokens=self.total_tokens,
            params=self.shape.total_params,
            memory_per_device_gib=to_gib(self.memory.total),
            device_memory_gib=device.memory_gib,
            est_step_seconds=None if est is None else round(est.step_seconds, 2),
            est_tokens_per_sec=None if est is None else round(est.tokens_per_sec, 1),
            est_mfu_percent=None if est is None else round(100 * est.mfu, 1),
            est_wall_hours=None if est is None else round(est.wall_hours, 2),
            instance_hours=None if est is None else round(est.instance_hours, 1),
            est_cost_usd=None if est is None or est.cost_usd is None else round(est.cost_usd, 2),
            checkpoint_size_gib=to_gib(self.checkpoint_bytes or 0.0),
            warnings=[str(w) for w in self.warnings],
        )
        return summary.to_wire()

    def to_dict(self) -> dict[str, Any]:
        """Everything, for ``cpt plan --json``."""
        out: dict[str, Any] = {
            "ok": self.ok,
            "mode": self.mode,
            "errors": [str(e) for e in self.errors],
            "warnings": [str(w) for w in self.warnings],
        }
        if self.ok:
            out["plan"] = self.summary()
            out["memory"] = self.memory.to_dict() if self.memory else None
            out["flopsPerToken"] = self.shape.flops_per_token(self.seq_len) if self.shape else None
            out["estimateBasis"] = self.estimate.basis if self.estimate else None
            out["pricePerHourUsd"] = self.estimate.price_per_hour if self.estimate else None
            out["priceTable"] = {k: price_table()[k] for k in ("as_of", "region", "currency")}
            out["mixture"] = [r.to_dict() for r in self.mixture]
            if self.pod_security is not None:
                out["podSecurity"] = {
                    "level": self.pod_security.level,
                    "why": [
                        {"field": d.field, "level": d.level, "why": d.why}
                        for d in self.pod_security.departures
                    ],
                }
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def to_gib(value: float) -> float:
    """Bytes as GiB, rounded to 2 decimals (the unit of every figure the plan shows)."""
    return round(value / GIB, 2)
