"""ContinualPretrain status models (phase, conditions, plan summary, progress, attempts).

Split from models.py, which re-exports every name here; the CRD's status schema is generated
from these (``cpt_operator.api.crd``).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import ConfigDict, Field

from cpt_operator.api.fields import MAX_EXCLUDED_NODES_LIMIT, NAME_MAX_LENGTH
from cpt_training.config import CamelModel


class Phase(StrEnum):
    PENDING = "Pending"
    PLANNING = "Planning"
    PREFLIGHT = "Preflight"
    TOKENIZING = "Tokenizing"
    PREPARING_WEIGHTS = "PreparingWeights"
    PRECOMPILING = "Precompiling"
    TRAINING = "Training"
    CONVERTING = "Converting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class ConditionType(StrEnum):
    """Condition types the operator sets (metav1.Condition semantics)."""

    PLANNED = "Planned"
    PREFLIGHT_PASSED = "PreflightPassed"
    DATA_READY = "DataReady"
    WEIGHTS_READY = "WeightsReady"
    PRECOMPILED = "Precompiled"
    TRAINING = "Training"
    EXPORTED = "Exported"
    SUSPENDED = "Suspended"
    QUEUED = "Queued"
    """True while Kueue holds the training job suspended (not admitted yet, or preempted),
    with Kueue's reason and message."""
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    READY = "Ready"
    """The summary: True once the run succeeded; False, with the reason, before that."""
    SPEC_ACCEPTED = "SpecAccepted"
    """False while the newest generation of the spec is refused (the run goes on with the
    last accepted one, status.acceptedSpec); the reason names the class, the message the
    fields."""


class StatusModel(CamelModel):
    """Status is written by the operator and read back; tolerate fields a newer operator
    added instead of failing the reconcile."""

    model_config = ConfigDict(extra="ignore")


class Condition(StatusModel):
    """metav1.Condition: reason, message and lastTransitionTime always set."""

    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1, max_length=1024)
    message: str = Field(max_length=32768)
    last_transition_time: datetime
    observed_generation: int | None = Field(default=None, ge=0)


class PlanSummary(StatusModel):
    """What the planner decided and estimated (``cpt plan`` prints the same)."""

    backend: Literal["nxd", "native"]
    instance_type: str
    nodes: int
    processes_per_node: int
    world_size: int
    data_parallel: int
    tensor_parallel: int
    pipeline_parallel: int
    kv_size_multiplier: int = 1
    micro_batch_size: int
    grad_accum_steps: int = Field(description="Micro-batches per replica per step.")
    pipeline_microbatches: int | None = Field(default=None, description="When PP > 1.")
    tokens_per_step: int
    max_steps: int
    total_tokens: int
    params: int
    memory_per_device_gib: float
    device_memory_gib: float | None = None
    est_step_seconds: float | None = None
    est_tokens_per_sec: float | None = None
    est_mfu_percent: float | None = None
    est_wall_hours: float | None = None
    instance_hours: float | None = None
    est_cost_usd: float | None = None
    checkpoint_size_gib: float | None = None
    warnings: list[str] = Field(default_factory=list)


class CheckpointStatus(StatusModel):
    step: int
    uri: str
    time: datetime | None = None
    save_seconds: float | None = Field(
        default=None,
        description="How long the trainer took to save and commit it (progress.json): sets "
        "the next attempt's terminationGracePeriodSeconds.",
    )


class ProgressStatus(StatusModel):
    step: int = 0
    max_steps: int = 0
    step_of_max: str = Field(default="", description="'step/maxSteps' for kubectl get.")
    loss: float | None = None
    tokens_per_sec: float | None = None
    mfu_percent: float | None = None
    lr: float | None = None
    eta: datetime | None = None
    updated_at: datetime | None = None


EVAL_SUMMARY_MAX = 200
"""Characters of ``status.eval.summary`` (the Eval column of ``kubectl get cpt -o wide``)."""


class SourceEvalStatus(StatusModel):
    """One data source's held-out loss at the latest in-training evaluation."""

    name: str = Field(max_length=NAME_MAX_LENGTH, description="The source's name.")
    loss: float | None = Field(default=None, description="Mean next-token loss (nats).")
    perplexity: float | None = None


class EvalStatus(StatusModel):
    """The latest held-out evaluation per data source (training.evalEverySteps), from
    progress.json; the export's before/after comparison is in the output's eval.json."""

    step: int = Field(ge=0, description="The training step the evaluation ran after.")
    sources: list[SourceEvalStatus] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    summary: str = Field(
        default="",
        max_length=EVAL_SUMMARY_MAX,
        description="'name=loss,...@step' for kubectl get -o wide.",
    )

    @staticmethod
    def make(step: int, losses: list[tuple[str, float | None, float | None]]) -> EvalStatus:
        """From (name, loss, perplexity) per source, losses rounded to 4 places."""
        sources: list[SourceEvalStatus] = []
        for name, loss, ppl in losses:
            key = name[:NAME_MAX_LENGTH]
            if len(sources) == 64 or any(s.name == key for s in sources):
                continue  # a list map: the API server refuses repeated keys
            sources.append(
                SourceEvalStatus(
                    name=key,
                    loss=None if loss is None else round(loss, 4),
                    perplexity=None if ppl is None else round(ppl, 3),
                )
            )
        return EvalStatus(step=step, sources=sources, summary=eval_summary(step, sources))


def eval_summary(step: int, sources: list[SourceEvalStatus]) -> str:
    """``domain=2.314,replay=3.050@40``: no spaces, so the wide table keeps its columns; the
    sources that do not fit are counted instead (``domain=2.314,+3@40``)."""
    parts = [f"{s.name}={'-' if s.loss is None else f'{s.loss:.3f}'}" for s in sources]

    def text(shown: int) -> str:
        rest = [f"+{len(parts) - shown}"] if shown < len(parts) else []
        return ",".join(parts[:shown] + rest) + f"@{step}"

    shown = len(parts)
    while shown and len(text(shown)) > EVAL_SUMMARY_MAX:
        shown -= 1
    return text(shown)


class ChildrenStatus(StatusModel):
    tokenize: str | None = None
    weights: str | None = None
    preflight: str | None = None
    precompile: str | None = None
    train: str | None = None
    export: str | None = None


class AttemptStatus(StatusModel):
    """One training attempt as the operator saw it (the history survives child deletion: the
    attempt counter lives on the run, never only on a child)."""

    attempt: int = Field(ge=1)
    start_time: datetime | None = None
    running_since: datetime | None = Field(
        default=None, description="When every training pod of the attempt was first Running."
    )
    last_step: int | None = Field(default=None, description="Newest step seen in progress.json.")
    last_step_time: datetime | None = Field(
        default=None, description="When lastStep was first seen (the hang clock)."
    )
    end_time: datetime | None = None
    reason: str = Field(default="", max_length=1024, description="Why the attempt ended.")
    message: str = Field(default="", max_length=32768)
    resume_from_step: int | None = Field(
        default=None, description="The committed checkpoint step the attempt should resume from."
    )
    admitted_time: datetime | None = Field(
        default=None,
        description="When Kueue last admitted (unsuspended) the attempt: the pending clock "
        "starts here, so time in the queue never counts against pendingTimeoutSeconds.",
    )
    queued_seconds: int = Field(default=0, ge=0, description="Time the attempt spent queued.")


class PreflightStatus(StatusModel):
    """What the preflight check measured (its result.json), also posted as an Event."""

    passed: bool
    bus_bandwidth_gbps: float | None = Field(
        default=None, description="Mean all-reduce bus bandwidth over every rank (Gbps)."
    )
    best_bus_bandwidth_gbps: float | None = Field(
        default=None, description="The best iteration's bus bandwidth (Gbps)."
    )
    min_bus_bandwidth_gbps: float = Field(
        default=0.0, description="The threshold (spec.resiliency.preflight); 0 only reports."
    )
    world_size: int | None = None
    failing_nodes: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Pods (one per node) whose ranks failed their device check.",
    )
    problems: list[str] = Field(
        default_factory=list, max_length=16, description="The first problems reported."
    )


class ExcludedNode(StatusModel):
    """A node the run's later training attempts avoid (spec.resiliency.excludeFailedNodes)."""

    node: str = Field(max_length=NAME_MAX_LENGTH, description="The node's name (its hostname).")
    reason: str = Field(
        max_length=1024,
        description="NodeNotReady (NotReady past nodeNotReadySeconds), NodeGone (deleted) or "
        "DeviceUnhealthy (the kubelet refused a training pod: unhealthy accelerator devices).",
    )
    attempt: int = Field(
        ge=0, description="The attempt that failed on the node (0: the preflight check)."
    )
    since: datetime | None = Field(default=None, description="When the exclusion was recorded.")


MAX_ATTEMPTS_LIMIT = 100
"""spec.resiliency.maxAttempts' upper bound: status.attempt and the attempt in a training
child's name never exceed it (`<run>-train-<n>` stays within 63 characters)."""
ACCEPTED_SPEC_MAX_BYTES = 64 * 1024


class AcceptedSpec(StatusModel):
    """The spec the operator acts on (reconcile/accept.py). Only the mutable sections are
    copied (runtime, resiliency, output, suspend; the others cannot change once created):
    no secret value is ever in them (Secrets are referenced by name), and their size is
    bounded (ACCEPTED_SPEC_MAX_BYTES)."""

    generation: int = Field(ge=1, description="The metadata.generation that was accepted.")
    digest: str = Field(
        max_length=80, description="sha256 of the whole accepted spec (canonical JSON)."
    )
    spec: dict[str, Any] = Field(
        default_factory=dict,
        description="The accepted runtime, resiliency, output and suspend.",
    )


class ContinualPretrainStatus(StatusModel):
    phase: Phase = Phase.PENDING
    observed_generation: int | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    attempt: int = Field(default=0, ge=0, le=MAX_ATTEMPTS_LIMIT)
    plan: PlanSummary | None = None
    checkpoint: CheckpointStatus | None = None
    progress: ProgressStatus | None = None
    eval: EvalStatus | None = Field(
        default=None,
        description="The latest held-out loss per data source during training "
        "(training.evalEverySteps).",
    )
    tensorboard_uri: str | None = None
    output_uri: str | None = None
    children: ChildrenStatus = Field(default_factory=ChildrenStatus)
    start_time: datetime | None = None
    completion_time: datetime | None = None
    message: str = Field(default="", max_length=32768)
    attempts: list[AttemptStatus] = Field(
        default_factory=list,
        max_length=MAX_ATTEMPTS_LIMIT,
        description="Training attempts, oldest first.",
    )
    resume_from: CheckpointStatus | None = Field(
        default=None, description="The checkpoint the current attempt is expected to resume from."
    )
    suspended_phase: Phase | None = Field(
        default=None, description="The phase to continue with when spec.suspend is cleared."
    )
    deadline_exceeded_at: datetime | None = Field(
        default=None, description="When activeDeadlineSeconds stopped the run."
    )
    suspended_seconds: int = Field(
        default=0, ge=0, description="Time spent suspended, excluded from the deadline."
    )
    queued_seconds: int = Field(
        default=0,
        ge=0,
        description="Time the stage Jobs (tokenize, weights, precompile, export) spent held by "
        "Kueue, excluded from the deadline (training attempts keep theirs in "
        "attempts[].queuedSeconds).",
    )
    suspended_since: datetime | None = Field(
        default=None, description="When the current suspension began."
    )
    preflight: PreflightStatus | None = Field(
        default=None, description="The preflight check's measurement and verdict."
    )
    excluded_nodes: list[ExcludedNode] = Field(
        default_factory=list,
        max_length=MAX_EXCLUDED_NODES_LIMIT,
        description="Nodes later training attempts avoid (spec.resiliency.excludeFailedNodes), "
        "oldest first.",
    )
    accepted_spec: AcceptedSpec | None = Field(
        default=None,
        description="The last accepted spec: what the operator acts on while a newer "
        "generation is refused (condition SpecAccepted).",
    )
    kopf: dict[str, Any] | None = Field(
        default=None, description="kopf's own bookkeeping (progress storage); opaque."
    )
