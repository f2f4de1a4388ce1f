"""Condition types, reasons and the metav1.Condition setter.

Reasons are API: docs/operations.md explains each and what to do about it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from cpt_operator.api.models import Condition, ConditionType, ContinualPretrainStatus

# Why a run failed (condition Failed=True).
INVALID_SPEC: Final = "InvalidSpec"
PREFLIGHT_FAILED: Final = "PreflightFailed"
TOKENIZATION_FAILED: Final = "TokenizationFailed"
WEIGHT_CONVERSION_FAILED: Final = "WeightConversionFailed"
MAX_ATTEMPTS_EXCEEDED: Final = "MaxAttemptsExceeded"
EXPORT_FAILED: Final = "ExportFailed"
DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
PRECOMPILE_FAILED: Final = "PrecompileFailed"

# Why a training attempt ended (attempts[].reason, condition Training=False while restarting).
POD_FAILED: Final = "PodFailed"
NODE_NOT_READY: Final = "NodeNotReady"
PENDING_TIMEOUT: Final = "PendingTimeout"
HANG: Final = "NoProgress"
JOB_FAILED: Final = "TrainingJobFailed"
JOB_RESTARTING: Final = "TrainingJobRestarting"
JOB_DELETED: Final = "TrainingJobDeleted"
SUSPENDED: Final = "Suspended"
COMPLETED: Final = "Completed"
PREEMPTED: Final = "Preempted"
"""Stopped from outside with a chance to checkpoint (the trainer's exit 75, a pod deleted or
evicted, a scheduler preemption): not counted against maxAttempts."""

# Why a node is in status.excludedNodes (spec.resiliency.excludeFailedNodes).
EXCLUDED_NOT_READY: Final = "NodeNotReady"
EXCLUDED_GONE: Final = "NodeGone"
EXCLUDED_DEVICE_UNHEALTHY: Final = "DeviceUnhealthy"
EXCLUDED_PREFLIGHT_FAILED: Final = "PreflightFailed"

# Events about node exclusions.
NODE_EXCLUDED: Final = "NodeExcluded"
NODE_EXCLUSION_DROPPED: Final = "NodeExclusionDropped"

# Event reasons of phase changes: CamelCase verbs saying what happened (the API
# conventions' form), not the phase the run is in now.
TRANSITION_REASONS: Final = {
    "Planning": "StartedPlanning",
    "Preflight": "StartedPreflight",
    "Tokenizing": "StartedTokenization",
    "PreparingWeights": "StartedWeightPreparation",
    "Precompiling": "StartedPrecompile",
    "Training": "StartedTraining",
    "Converting": "StartedExport",
    "Succeeded": "Succeeded",
    "Failed": "Failed",
    "Suspended": "Suspended",
}
RESUMED: Final = "Resumed"
IN_PROGRESS: Final = "InProgress"

Status = Literal["True", "False", "Unknown"]


def transition_reason(old: str, new: str) -> str:
    """The Event reason of a phase change from `old` to `new`."""
    if old == "Suspended" and new not in ("Succeeded", "Failed"):
        return RESUMED
    return TRANSITION_REASONS[new]


def set_ready(status: ContinualPretrainStatus, *, now: datetime, generation: int | None) -> None:
    """The summary condition: Ready=True once the run succeeded (its model is exported),
    False with the reason while it works, is suspended or failed."""
    phase = status.phase.value
    value: Status = "True" if phase == "Succeeded" else "False"
    reason = phase if phase in ("Succeeded", "Failed", "Suspended") else IN_PROGRESS
    set_condition(
        status, "Ready", value, reason, status.message or phase, now=now, generation=generation
    )


def get(status: ContinualPretrainStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def set_condition(
    status: ContinualPretrainStatus,
    type_: ConditionType | str,
    value: Status,
    reason: str,
    message: str,
    *,
    now: datetime,
    generation: int | None,
) -> None:
    """Insert or update; lastTransitionTime moves only when the status value changes."""
    type_s = str(type_)
    current = get(status, type_s)
    if current is None:
        status.conditions.append(
            Condition(
                type=type_s,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=now,
                observed_generation=generation,
            )
        )
        return
    if current.status != value:
        current.last_transition_time = now
    current.status = value
    current.reason = reason
    current.message = message
    current.observed_generation = generation
