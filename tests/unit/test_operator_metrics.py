"""The operator's /metrics: per-run gauges from the stored status (gone with the run), the
reconcile counters and histogram, watch restarts from kopf's log, and the HTTP endpoint.
tests/e2e/test_prometheus.py scrapes the same endpoint with a real Prometheus."""

from __future__ import annotations

import logging
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cpt_operator import metrics
from cpt_operator.api.models import Phase
from cpt_operator.metrics import WATCH_LOGGER, OperatorMetrics
from cpt_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def run_body(name: str = "r1", *, phase: str = "Training", attempt: int = 2) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "metadata": {"namespace": "ns", "name": name},
        "spec": {"resiliency": {"maxAttempts": 5}},
        "status": {
            "phase": phase,
            "attempt": attempt,
            "startTime": iso(now - timedelta(hours=1)),
            "progress": {
                "step": 120,
                "maxSteps": 400,
                "loss": 2.5,
                "lr": 3e-4,
                "tokensPerSec": 12345.0,
                "mfuPercent": 41.0,
                "eta": iso(now + timedelta(seconds=600)),
            },
            "checkpoint": {"step": 100, "uri": "s3://b/ckpt/step-100", "time": iso(now)},
            "conditions": [],
        },
    }


def samples(m: OperatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(m.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(m: OperatorMetrics, name: str, **labels: str) -> float | None:
    return samples(m).get((name, tuple(sorted(labels.items()))))


def test_a_runs_status_becomes_its_gauges() -> None:
    m = OperatorMetrics()
    m.runs.update(run_body())
    run = {"namespace": "ns", "run": "r1"}
    assert value(m, "cpt_run_step", **run) == 120
    assert value(m, "cpt_run_max_steps", **run) == 400
    assert value(m, "cpt_run_attempt", **run) == 2
    assert value(m, "cpt_run_retries_remaining", **run) == 3
    assert value(m, "cpt_run_loss", **run) == 2.5
    assert value(m, "cpt_run_tokens_per_second", **run) == 12345
    assert value(m, "cpt_run_mfu_ratio", **run) == pytest.approx(0.41)
    assert value(m, "cpt_run_last_committed_step", **run) == 100
    assert 0 <= (value(m, "cpt_run_last_commit_age_seconds", **run) or -1) < 5
    assert 590 < (value(m, "cpt_run_eta_seconds", **run) or 0) <= 600
    assert value(m, "cpt_run_phase", phase="Training", **run) == 1
    assert value(m, "cpt_run_phase", phase="Pending", **run) == 0
    phases = [k for k in samples(m) if k[0] == "cpt_run_phase"]
    assert len(phases) == len(Phase)  # one series per phase: the label's values are bounded


def test_values_the_status_lacks_have_no_series_and_eta_only_while_training() -> None:
    m = OperatorMetrics()
    body = run_body(phase="Succeeded")
    del body["status"]["progress"]["loss"]
    m.runs.update(body)
    names = {k[0] for k in samples(m)}
    assert "cpt_run_loss" not in names
    assert "cpt_run_eta_seconds" not in names
    assert "cpt_run_step" in names


def test_a_deleted_run_leaves_no_series_behind() -> None:
    m = OperatorMetrics()
    with ThreadPoolExecutor(1) as pool:
        m.track(run_body("r1"), "ADDED", pool)
        m.track(run_body("r2"), "MODIFIED", pool)
        m.track(run_body("r1"), "DELETED", pool)
    runs = {dict(labels).get("run") for _, labels in samples(m)}
    assert "r1" not in runs
    assert "r2" in runs


def test_the_preflight_bandwidth_is_read_once_after_the_check_passed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[str] = []

    def fake_read(body: dict[str, Any]) -> float:
        reads.append(body["metadata"]["name"])
        return 2.5e9

    monkeypatch.setattr(metrics, "read_preflight_bandwidth", fake_read)
    m = OperatorMetrics()
    body = run_body()
    with ThreadPoolExecutor(1) as pool:
        m.track(body, "MODIFIED", pool)  # not passed yet: no read
        body["status"]["conditions"] = [{"type": "PreflightPassed", "status": "True"}]
        m.track(body, "MODIFIED", pool)
        m.track(body, "MODIFIED", pool)
    assert reads == ["r1"]
    name = "cpt_run_preflight_bus_bandwidth_bytes_per_second"
    assert value(m, name, namespace="ns", run="r1") == 2.5e9


def test_reconcile_passes_count_and_time_and_failures_count_apart() -> None:
    m = OperatorMetrics()
    m.observe_pass(0.02, failed=False)
    m.observe_pass(3.0, failed=True)
    assert value(m, "cpt_reconcile_total") == 2
    assert value(m, "cpt_reconcile_errors_total") == 1
    assert value(m, "cpt_reconcile_duration_seconds_count") == 2
    assert value(m, "cpt_reconcile_duration_seconds_bucket", le="0.025") == 1


def test_a_watch_stream_started_again_counts_as_a_restart() -> None:
    m = OperatorMetrics()
    m.count_watch_restarts(debug=False)
    logger = logging.getLogger(WATCH_LOGGER)
    try:
        for _ in range(3):
            logger.debug(
                "Starting the watch-stream for continualpretrains.v1alpha1.cpt.dev in 'a'."
            )
        logger.debug("Starting the watch-stream for jobs.v1 in 'a'.")
    finally:
        m.close()
    resource = "continualpretrains.v1alpha1.cpt.dev"
    assert value(m, "cpt_watch_restarts_total", resource=resource) == 2
    assert value(m, "cpt_watch_restarts_total", resource="jobs.v1") is None


def test_the_endpoint_serves_the_registry_over_http() -> None:
    m = OperatorMetrics()
    m.runs.update(run_body())
    port = m.serve(0, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        m.close()
    assert 'cpt_run_step{namespace="ns",run="r1"} 120.0' in text
    assert "# TYPE cpt_reconcile_duration_seconds histogram" in text


def test_a_port_in_use_is_logged_and_the_operator_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = OperatorMetrics()
    port = first.serve(0, "0.0.0.0")
    second = OperatorMetrics()
    try:
        with caplog.at_level(logging.ERROR, logger="cpt_operator"):
            second.start(OperatorSettings(metrics_port=port))
    finally:
        first.close()
        second.close()
    assert f"cannot serve metrics on :{port}" in caplog.text


def test_without_a_commit_time_the_age_counts_from_when_the_step_was_first_seen() -> None:
    m = OperatorMetrics()
    body = run_body()
    del body["status"]["checkpoint"]["time"]  # the operator's status has step and uri only
    m.runs.update(body)
    ts = "cpt_run_last_commit_timestamp_seconds"
    first = value(m, ts, namespace="ns", run="r1")
    m.runs.update(body)  # the same checkpoint again: the same commit time
    assert value(m, ts, namespace="ns", run="r1") == first
    body["status"]["checkpoint"]["step"] = 110
    m.runs.update(body)
    assert (value(m, ts, namespace="ns", run="r1") or 0) >= (first or 0)
    assert value(m, "cpt_run_last_committed_step", namespace="ns", run="r1") == 110


def test_held_out_loss_per_source_is_a_series_per_source_when_the_status_has_it() -> None:
    m = OperatorMetrics()
    body = run_body()
    m.runs.update(body)
    assert not [k for k in samples(m) if k[0] == "cpt_run_eval_loss"]
    body["status"]["eval"] = {
        "step": 100,
        "sources": {"domain": {"loss": 3.25, "perplexity": 25.8}, "replay": {"loss": None}},
    }
    m.runs.update(body)
    assert value(m, "cpt_run_eval_loss", namespace="ns", run="r1", source="domain") == 3.25
    assert [k for k in samples(m) if k[0] == "cpt_run_eval_loss"] == [
        ("cpt_run_eval_loss", (("namespace", "ns"), ("run", "r1"), ("source", "domain")))
    ]


def test_the_watch_log_record_counted_is_the_one_kopf_writes() -> None:
    """Guards a kopf upgrade: the logger and the message the restart count relies on."""
    import inspect

    from kopf._cogs.clients import watching

    assert watching.logger.name == WATCH_LOGGER
    assert "Starting the watch-stream for {resource}" in inspect.getsource(watching)
