"""The operator's configuration: nine knobs, read once at start-up and passed in.

Each field is one environment variable that the chart sets from one value
(charts/cpt/values.yaml, `operator.*` and `watchNamespace`); tests/unit/test_settings.py fails
when the three drift apart. Nothing in the operator reads the environment anywhere else
(S3 access uses the standard AWS variables, read by botocore).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cpt_operator.reconcile.admission import Policy

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
DEFAULT_METRICS_PORT = 8081
LOG_LEVELS = ("DEBUG", "INFO")
POSTING_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True, kw_only=True)
class OperatorSettings:
    namespaces: tuple[str, ...] = ()
    """CPT_WATCH_NAMESPACES (chart: watchNamespace): namespaces to watch, comma-separated;
    empty watches the whole cluster."""
    resync_seconds: float = 10.0
    """CPT_RESYNC_SECONDS (operator.reconcileIntervalSeconds): how often every active run is
    reconciled without an event (S3 progress, pending/hang/node timeouts)."""
    workers: int = 32
    """CPT_WORKER_LIMIT (operator.workerLimit): reconciles running at once (worker threads,
    and HTTP connections to the API server)."""
    log_level: str = "INFO"
    """CPT_LOG_LEVEL (operator.logLevel): DEBUG adds kopf's log of every event."""
    posting_level: str = "WARNING"
    """CPT_POSTING_LEVEL (operator.postingLevel): lowest level of kopf's own messages
    (handler errors) that it posts as Events on a run. The operator's Events are always
    posted."""
    liveness_endpoint: str | None = DEFAULT_LIVENESS
    """CPT_LIVENESS_ENDPOINT (operator.healthPort): kopf's liveness URL; "" turns it off."""
    metrics_port: int = DEFAULT_METRICS_PORT
    """CPT_METRICS_PORT (metrics.port; metrics.enabled false sets 0): the port of the
    Prometheus ``/metrics`` endpoint (cpt_operator/metrics.py); 0 turns it off."""
    allow_system_priority_classes: bool = False
    """CPT_ALLOW_SYSTEM_PRIORITY_CLASSES (operator.allowSystemPriorityClasses): runs may use
    the system-* priority classes (reconcile/admission.py, Policy)."""
    allow_host_path_scratch: bool = True
    """CPT_ALLOW_HOST_PATH_SCRATCH (operator.allowHostPathScratch): runs may use scratch
    type hostPath (a node's directory, e.g. instance-store NVMe)."""

    def __post_init__(self) -> None:
        if self.resync_seconds <= 0:
            raise ValueError(f"CPT_RESYNC_SECONDS must be > 0, got {self.resync_seconds}")
        if self.workers < 1:
            raise ValueError(f"CPT_WORKER_LIMIT must be >= 1, got {self.workers}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"CPT_METRICS_PORT must be 0..65535, got {self.metrics_port}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"CPT_LOG_LEVEL must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.posting_level not in POSTING_LEVELS:
            raise ValueError(
                f"CPT_POSTING_LEVEL must be one of {POSTING_LEVELS}, got {self.posting_level!r}"
            )

    @property
    def policy(self) -> Policy:
        return Policy(self.allow_system_priority_classes, self.allow_host_path_scratch)

    @property
    def posting_level_number(self) -> int:
        return int(logging.getLevelName(self.posting_level))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """From the variables the chart sets (unset ones keep their defaults)."""
        env = os.environ if env is None else env

        def number(name: str, kind: type[float] | type[int], default: float) -> Any:
            try:
                return kind(env.get(name, default))
            except ValueError:
                raise ValueError(f"{name} must be a number, got {env[name]!r}") from None

        def flag(name: str, default: bool) -> bool:
            value = env.get(name, "").strip().lower()
            if value in ("", "true", "false"):
                return default if not value else value == "true"
            raise ValueError(f"{name} must be true or false, got {env[name]!r}")

        names = (n.strip() for n in env.get("CPT_WATCH_NAMESPACES", "").split(","))
        return cls(
            namespaces=tuple(n for n in names if n),
            resync_seconds=number("CPT_RESYNC_SECONDS", float, cls.resync_seconds),
            workers=number("CPT_WORKER_LIMIT", int, cls.workers),
            log_level=env.get("CPT_LOG_LEVEL", cls.log_level).upper(),
            posting_level=env.get("CPT_POSTING_LEVEL", cls.posting_level).upper(),
            liveness_endpoint=env.get("CPT_LIVENESS_ENDPOINT", DEFAULT_LIVENESS) or None,
            metrics_port=number("CPT_METRICS_PORT", int, cls.metrics_port),
            allow_system_priority_classes=flag(
                "CPT_ALLOW_SYSTEM_PRIORITY_CLASSES", cls.allow_system_priority_classes
            ),
            allow_host_path_scratch=flag(
                "CPT_ALLOW_HOST_PATH_SCRATCH", cls.allow_host_path_scratch
            ),
        )


ENV_NAMES = (
    "CPT_WATCH_NAMESPACES",
    "CPT_RESYNC_SECONDS",
    "CPT_WORKER_LIMIT",
    "CPT_LOG_LEVEL",
    "CPT_POSTING_LEVEL",
    "CPT_LIVENESS_ENDPOINT",
    "CPT_METRICS_PORT",
    "CPT_ALLOW_SYSTEM_PRIORITY_CLASSES",
    "CPT_ALLOW_HOST_PATH_SCRATCH",
)
"""Every variable `from_env` reads, in field order (the chart sets each)."""
