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

# Why a node is in status.excludedNodes (spec.resiliency.excludeFailedNodes).
EXCLUDED_NOT_READY: Final = "NodeNotReady"
EXCLUDED_GONE: Final = "NodeGone"
EXCLUDED_DEVICE_UNHEALTHY: Final = "DeviceUnhealthy"

# Events about node exclusions.
NODE_EXCLUDED: Final = "NodeExcluded"
NODE_EXCLUSION_DROPPED: Final = "NodeExclusionDropped"

Status = Literal["True", "False", "Unknown"]


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
