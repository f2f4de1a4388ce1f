"""The operator's Prometheus metrics, served on ``/metrics`` by the operator process.

Per run (labels ``namespace`` and ``run``; ``phase`` on ``cpt_run_phase`` takes the ten values
of the Phase enum, ``source`` on ``cpt_run_eval_loss`` the run's data source names): what
``kubectl get cpt`` shows, as numbers a dashboard can draw over time. They come from the run's
stored status as the watch delivers it (every status patch the operator makes comes back as a
watch event), so they show what the API server holds, and a deleted run's series go with its
DELETED event. Values that depend on the clock (checkpoint age, ETA) are computed when
Prometheus scrapes.

Operator health: reconcile passes (count, duration histogram, failures) and restarts of kopf's
watch streams (counted from kopf's own "Starting the watch-stream" log record: kopf has no
hook for it, and a stream that keeps restarting is how a broken watch shows).

Names follow Prometheus conventions: base units (seconds, bytes, ratios), ``_total`` for
counters; ``docs/operations.md`` lists them with the dashboard built on them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cpt_operator.api.status_models import Phase
from cpt_operator.settings import OperatorSettings

log = logging.getLogger("cpt_operator")

LABELS = ("namespace", "run")
WATCH_LOGGER = "kopf._cogs.clients.watching"
_WATCH_START = "Starting the watch-stream for "

# (metric name, help) of the per-run gauges, in exposition order.
RUN_GAUGES: dict[str, str] = {
    "cpt_run_attempt": "Training attempt in progress or last made (0 before training).",
    "cpt_run_retries_remaining": "Training attempts left after the current one.",
    "cpt_run_step": "Newest optimizer step reported by the trainer.",
    "cpt_run_max_steps": "Optimizer steps the run trains for.",
    "cpt_run_loss": "Training loss at the newest reported step.",
    "cpt_run_learning_rate": "Learning rate at the newest reported step.",
    "cpt_run_tokens_per_second": "Training throughput, tokens per second (all ranks).",
    "cpt_run_mfu_ratio": "Model FLOPs utilization, a fraction of the devices' peak.",
    "cpt_run_last_committed_step": "Step of the newest committed checkpoint.",
    "cpt_run_last_commit_timestamp_seconds": "When the newest checkpoint was committed.",
    "cpt_run_last_commit_age_seconds": "Seconds since the newest checkpoint was committed.",
    "cpt_run_eta_seconds": "Estimated seconds until training reaches max steps.",
    "cpt_run_start_timestamp_seconds": "When the run started (first child).",
    "cpt_run_preflight_bus_bandwidth_bytes_per_second": "All-reduce bus bandwidth measured "
    "by the preflight check.",
}
PHASE_HELP = "1 for the run's phase, 0 for the others."
EVAL_HELP = "Held-out loss per data source at the newest evaluation (status.eval)."


def _seconds(value: Any) -> float | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass
class RunSample:
    """What the metrics need of one run, kept from its newest watch event."""

    phase: str
    values: dict[str, float] = field(default_factory=dict)
    commit_time: float | None = None
    eta: float | None = None
    eval_loss: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> RunSample:
        spec, status = body.get("spec") or {}, body.get("status") or {}
        progress = status.get("progress") or {}
        checkpoint = status.get("checkpoint") or {}
        plan = status.get("plan") or {}
        attempt = int(status.get("attempt") or 0)
        max_attempts = _number((spec.get("resiliency") or {}).get("maxAttempts")) or 3.0
        mfu = _number(progress.get("mfuPercent"))
        raw: dict[str, float | None] = {
            "cpt_run_attempt": float(attempt),
            "cpt_run_retries_remaining": max(0.0, max_attempts - max(attempt, 1)),
            "cpt_run_step": _number(progress.get("step")),
            "cpt_run_max_steps": _number(progress.get("maxSteps")) or _number(plan.get("maxSteps")),
            "cpt_run_loss": _number(progress.get("loss")),
            "cpt_run_learning_rate": _number(progress.get("lr")),
            "cpt_run_tokens_per_second": _number(progress.get("tokensPerSec")),
            "cpt_run_mfu_ratio": None if mfu is None else mfu / 100.0,
            "cpt_run_last_committed_step": _number(checkpoint.get("step")),
            "cpt_run_last_commit_timestamp_seconds": _seconds(checkpoint.get("time")),
            "cpt_run_start_timestamp_seconds": _seconds(status.get("startTime")),
        }
        return cls(
            phase=str(status.get("phase") or Phase.PENDING.value),
            values={k: v for k, v in raw.items() if v is not None},
            commit_time=raw["cpt_run_last_commit_timestamp_seconds"],
            eta=_seconds(progress.get("eta")),
            eval_loss=_eval_losses(status.get("eval")),
        )


def _eval_losses(section: Any) -> dict[str, float]:
    """{source: loss} from ``status.eval`` when the status has one (``{step, sources: {name:
    {loss, ...}}}``, the shape of progress.json's ``eval``); anything else reads as none. The
    sources are the spec's data sources, so the ``source`` label stays bounded."""
    sources = section.get("sources") if isinstance(section, Mapping) else None
    if not isinstance(sources, Mapping):
        return {}
    out = {}
    for name, entry in sources.items():
        loss = _number(entry.get("loss") if isinstance(entry, Mapping) else entry)
        if loss is not None:
            out[str(name)] = loss
    return out


class RunCollector(Collector):
    """The per-run gauges, built at scrape time from the newest sample of each live run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, str], RunSample] = {}
        self._bandwidth: dict[tuple[str, str], float | None] = {}
        """Preflight bus bandwidth by run; None while (or after) a read found nothing."""

    def update(self, body: Mapping[str, Any]) -> None:
        """The run's newest status. A checkpoint without a commit time in the status gets the
        time this process first saw its step (at most a resync period late)."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        sample = RunSample.of(body)
        step = sample.values.get("cpt_run_last_committed_step")
        with self._lock:
            old = self._runs.get(key)
            if sample.commit_time is None and step is not None:
                seen = time.time()
                if old is not None and old.values.get("cpt_run_last_committed_step") == step:
                    seen = old.commit_time or seen
                sample.commit_time = seen
                sample.values["cpt_run_last_commit_timestamp_seconds"] = seen
            self._runs[key] = sample

    def set_preflight_bandwidth(
        self, namespace: str, run: str, bytes_per_second: float | None
    ) -> None:
        with self._lock:
            if (namespace, run) in self._runs:  # not for a run deleted meanwhile
                self._bandwidth[(namespace, run)] = bytes_per_second

    def has_preflight_bandwidth(self, namespace: str, run: str) -> bool:
        with self._lock:
            return (namespace, run) in self._bandwidth

    def forget(self, namespace: str, run: str) -> None:
        with self._lock:
            self._runs.pop((namespace, run), None)
            self._bandwidth.pop((namespace, run), None)

    def runs(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._runs)

    def collect(self) -> Iterator[Metric]:
        now = datetime.now(UTC).timestamp()
        with self._lock:
            runs = dict(self._runs)
            bandwidth = dict(self._bandwidth)
        phase = GaugeMetricFamily("cpt_run_phase", PHASE_HELP, labels=[*LABELS, "phase"])
        evals = GaugeMetricFamily("cpt_run_eval_loss", EVAL_HELP, labels=[*LABELS, "source"])
        gauges = {
            name: GaugeMetricFamily(name, text, labels=list(LABELS))
            for name, text in RUN_GAUGES.items()
        }
        for key, sample in sorted(runs.items()):
            for p in Phase:
                phase.add_metric([*key, p.value], 1.0 if sample.phase == p.value else 0.0)
            values = dict(sample.values)
            if sample.commit_time is not None:
                values["cpt_run_last_commit_age_seconds"] = max(0.0, now - sample.commit_time)
            if sample.eta is not None and sample.phase == Phase.TRAINING.value:
                values["cpt_run_eta_seconds"] = max(0.0, sample.eta - now)
            if (bus := bandwidth.get(key)) is not None:
                values["cpt_run_preflight_bus_bandwidth_bytes_per_second"] = bus
            for name, value in values.items():
                gauges[name].add_metric(list(key), value)
            for source, loss in sorted(sample.eval_loss.items()):
                evals.add_metric([*key, source], loss)
        yield phase
        yield evals
        yield from gauges.values()


class _WatchRestarts(logging.Filter):
    """Counts kopf's watch-stream starts; every start after a stream's first is a restart.
    Passes the record on only when the operator logs at DEBUG (the logger is lowered to
    DEBUG so that the record exists at all)."""

    def __init__(self, counter: Counter, show: bool) -> None:
        super().__init__()
        self.counter = counter
        self.show = show
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_WATCH_START):
            stream = message[len(_WATCH_START) :].rstrip(".")
            resource = stream.split(" ", 1)[0]
            if stream in self.seen:
                self.counter.labels(resource=resource).inc()
            self.seen.add(stream)
        return self.show or record.levelno > logging.DEBUG


class OperatorMetrics:
    """Every metric of one operator process, in its own registry (tests run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.runs = RunCollector()
        self.registry.register(self.runs)
        # process_start_time_seconds and friends: the dashboard marks operator restarts.
        ProcessCollector(registry=self.registry)
        self.reconciles = Counter(
            "cpt_reconcile",
            "Reconcile passes over runs.",
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "cpt_reconcile_errors",
            "Reconcile passes that raised (the next wake-up or resync retries).",
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "cpt_reconcile_duration_seconds",
            "Wall time of one reconcile pass.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.watch_restarts = Counter(
            "cpt_watch_restarts",
            "Restarts of kopf's watch streams, by resource.",
            ["resource"],
            registry=self.registry,
        )
        self._filter: _WatchRestarts | None = None
        self._level = logging.NOTSET
        self._server: Any = None

    def observe_pass(self, seconds: float, *, failed: bool) -> None:
        self.reconciles.inc()
        self.reconcile_seconds.observe(seconds)
        if failed:
            self.reconcile_errors.inc()

    def start(self, settings: OperatorSettings) -> None:
        """Count watch restarts, and serve ``/metrics`` unless the port is 0. A port in use is
        logged, not fatal: the operator's work is the runs, and a missing target shows in
        Prometheus."""
        self.count_watch_restarts(debug=settings.log_level == "DEBUG")
        if settings.metrics_port:
            try:
                port = self.serve(settings.metrics_port)
                log.info("serving Prometheus metrics on :%d/metrics", port)
            except OSError as err:
                log.error("cannot serve metrics on :%d: %s", settings.metrics_port, err)

    def track(self, body: Mapping[str, Any], event_type: str | None, executor: Executor) -> None:
        """A run's watch event: its gauges follow its stored status, and go with DELETED. The
        preflight bandwidth is read from S3 once, in a worker thread, after the check passed."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if event_type == "DELETED":
            self.runs.forget(*key)
            return
        self.runs.update(body)
        conditions = (body.get("status") or {}).get("conditions") or []
        passed = any(
            c.get("type") == "PreflightPassed" and c.get("status") == "True" for c in conditions
        )
        if passed and not self.runs.has_preflight_bandwidth(*key):
            self.runs.set_preflight_bandwidth(*key, None)  # one read, whatever it finds

            def done(future: Future[float | None]) -> None:
                if future.exception() is None:
                    self.runs.set_preflight_bandwidth(*key, future.result())

            executor.submit(read_preflight_bandwidth, dict(body)).add_done_callback(done)

    def count_watch_restarts(self, *, debug: bool) -> None:
        logger = logging.getLogger(WATCH_LOGGER)
        self._filter = _WatchRestarts(self.watch_restarts, show=debug)
        self._level = logger.level
        logger.addFilter(self._filter)
        logger.setLevel(logging.DEBUG)

    def serve(self, port: int, address: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` from a daemon thread; returns the port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._filter is not None:
            logger = logging.getLogger(WATCH_LOGGER)
            logger.removeFilter(self._filter)
            logger.setLevel(self._level)
            self._filter = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def read_preflight_bandwidth(body: Mapping[str, Any]) -> float | None:
    """The bus bandwidth (bytes/s) in the run's preflight result, None when unreadable."""
    from cpt_operator.api.models import ContinualPretrainSpec
    from cpt_operator.builders import stages
    from cpt_training import storage

    meta = body.get("metadata") or {}
    try:
        spec = ContinualPretrainSpec.model_validate(body.get("spec") or {})
        uri = stages.paths(spec, str(meta.get("name")), str(meta.get("namespace")))
        result = storage.read_json(uri.preflight_result)
        return float(result["busBandwidthGbps"]) * 1e9 / 8
    except Exception as err:  # a metric is never worth a failed pass
        log.info("preflight result of %s not read: %s", meta.get("name"), err)
        return None


__all__ = ["OperatorMetrics", "RunCollector", "RunSample"]
