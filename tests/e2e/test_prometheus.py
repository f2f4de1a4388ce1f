"""A real Prometheus scrapes the operator while a run trains on the local control plane.

The operator runs as its own process with /metrics on; Debian's Prometheus server scrapes it
every second. PromQL then has to follow the run: the step rises as the trainer reports,
the attempt goes up after an injected worker failure (and the dashboard's attempt annotation
fires), and the run's series are gone after it is deleted. Every query of every panel of
the dashboard the chart ships (charts/cpt/dashboards/cpt.json) must return data for the
running run: a panel that would stay empty fails here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from e2e.harness import FakeTrainer, OperatorProcess, Runs, spec_body

from fixtures.cluster import REPO, Cluster, wait_for
from fixtures.prometheus import Prometheus, free_port, prometheus_server
from fixtures.s3 import S3Server

pytestmark = pytest.mark.e2e

DASHBOARD = REPO / "charts" / "cpt" / "dashboards" / "cpt.json"
JOB = "cpt-operator"


@pytest.fixture
def watched(
    crd: Cluster, namespace: str, s3: S3Server
) -> Iterator[tuple[Runs, Prometheus, OperatorProcess]]:
    port = free_port()
    op = OperatorProcess(crd, namespace, s3, metrics_port=port)
    op.start()
    try:
        with prometheus_server({JOB: f"127.0.0.1:{port}"}, crd.logs_dir) as prom:
            wait_for(prom.targets_up, timeout=60, what="Prometheus scraping the operator")
            yield Runs(crd, namespace, op), prom, op
    finally:
        op.stop()


def dashboard_queries(namespace: str, run: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, with the dashboard's variables set as
    Grafana would for this run."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$namespace", namespace)
                .replace("$run", run)
                .replace("$__rate_interval", "1m")
            )
            out.append((panel["title"], expr))
    return out


def annotation_query(name: str, namespace: str, run: str) -> str:
    dash = json.loads(DASHBOARD.read_text())
    (ann,) = [a for a in dash["annotations"]["list"] if a["name"] == name]
    return str(ann["expr"]).replace("$namespace", namespace).replace("$run", run)


def wait_value(prom: Prometheus, expr: str, want: float, what: str) -> None:
    wait_for(lambda: prom.value(expr) == want, timeout=60, what=f"{what} ({expr} == {want})")


def test_prometheus_follows_a_run_through_a_failure_and_its_deletion(
    watched: tuple[Runs, Prometheus, OperatorProcess], bucket: str, s3_env: S3Server
) -> None:
    runs, prom, _ = watched
    ns, run = runs.ns, "watched"
    sel = f'namespace="{ns}", run="{run}"'
    body = spec_body(
        run,
        bucket,
        training__maxSteps=40,
        resiliency={"preflight": {"enabled": False}, "maxAttempts": 3},
    )
    runs.create(body)
    runs.wait_phase(run, "Training", timeout=90)
    pods = runs.training_pods(run, 1, count=2)
    wait_value(prom, f'cpt_run_phase{{{sel}, phase="Training"}}', 1, "phase Training")

    trainer = FakeTrainer(body["spec"]["checkpoints"]["s3Uri"])
    trainer.commit(10)
    trainer.progress(attempt=1, step=12, max_steps=40, committed=10)
    wait_value(prom, f"cpt_run_step{{{sel}}}", 12, "step 12")
    wait_value(prom, f"cpt_run_last_committed_step{{{sel}}}", 10, "checkpoint 10")
    trainer.progress(attempt=1, step=20, max_steps=40, committed=10)
    wait_value(prom, f"cpt_run_step{{{sel}}}", 20, "step 20")
    assert prom.value(f"max_over_time(cpt_run_step{{{sel}}}[5m])") == 20
    assert prom.value(f"min_over_time(cpt_run_step{{{sel}}}[5m])") == 12  # it rose
    assert prom.value(f"cpt_run_max_steps{{{sel}}}") == 40
    assert prom.value(f"cpt_run_attempt{{{sel}}}") == 1
    assert prom.value(f"cpt_run_retries_remaining{{{sel}}}") == 2
    assert prom.value(f"cpt_run_mfu_ratio{{{sel}}}") == pytest.approx(0.31)

    # Every panel of the shipped dashboard shows something for this running run.
    empty = [(title, expr) for title, expr in dashboard_queries(ns, run) if not prom.query(expr)]
    assert empty == [], f"dashboard queries without data: {empty}"
    assert (prom.value("sum(cpt_reconcile_total)") or 0) > 0
    assert prom.value(f'process_start_time_seconds{{job="{JOB}"}}') is not None

    worker = next(p for p in pods if "worker" in p["metadata"]["name"])
    runs.finish_pod(worker["metadata"]["name"], ok=False, exit_code=137)
    wait_value(prom, f"cpt_run_attempt{{{sel}}}", 2, "attempt 2 after the failure")
    assert prom.value(f"cpt_run_retries_remaining{{{sel}}}") == 1
    annotations = prom.query(annotation_query("Training attempts", ns, run))
    assert [a["metric"]["run"] for a in annotations] == [run]

    runs.delete(run)
    wait_for(
        lambda: not prom.query(f'{{__name__=~"cpt_run_.*", {sel}}}'),
        timeout=60,
        what="the run's series gone from Prometheus after its deletion",
    )
    assert (prom.value("sum(cpt_reconcile_total)") or 0) > 0  # the operator's own stay
