"""The chart's metrics objects: the operator's /metrics port, the Service in front of it, the
ServiceMonitor (only where its CRD exists) and the Grafana dashboard ConfigMap. Golden renders
with metrics on, off and with a ServiceMonitor are in test_chart.py (tests/golden/chart/);
tests/e2e/test_prometheus.py runs the dashboard's queries against a real Prometheus."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_chart import CHART, container, env_of, objects, one, render

from cpt_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

SERVICE_MONITOR = ["--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"]


def kinds(objs: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objs)


def test_by_default_the_operator_serves_metrics_behind_a_service() -> None:
    objs = objects()
    c = container(objs)
    port = next(p for p in c["ports"] if p["name"] == "metrics")
    assert env_of(c)["CPT_METRICS_PORT"] == str(port["containerPort"]) == "8081"
    svc = one(objs, "Service")
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert "ServiceMonitor" not in kinds(objs)  # no Prometheus Operator CRDs offline


def test_metrics_off_turns_the_endpoint_and_every_metrics_object_off() -> None:
    objs = objects("--set", "metrics.enabled=false")
    c = container(objs)
    assert env_of(c)["CPT_METRICS_PORT"] == "0"
    assert OperatorSettings.from_env(env_of(c)).metrics_port == 0
    assert [p["name"] for p in c["ports"]] == ["healthz"]
    assert not {"Service", "ConfigMap", "ServiceMonitor"} & set(kinds(objs))


def test_the_service_monitor_renders_where_its_crd_exists_and_scrapes_the_service() -> None:
    objs = objects(*SERVICE_MONITOR, "--set", "metrics.serviceMonitor.labels.release=kps")
    sm = one(objs, "ServiceMonitor")
    svc = one(objs, "Service")
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [svc["metadata"]["namespace"]]}
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    off = objects(*SERVICE_MONITOR, "--set", "metrics.serviceMonitor.enabled=false")
    assert "ServiceMonitor" not in kinds(off)


def test_the_dashboard_configmap_carries_the_sidecar_label_and_the_shipped_json() -> None:
    cm = one(objects(), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "cpt.json").read_text())
    assert json.loads(cm["data"]["cpt.json"]) == shipped
    moved = one(
        objects(
            "--set", "metrics.dashboard.namespace=monitoring",
            "--set", "metrics.dashboard.annotations.grafana_folder=ML",
        ),
        "ConfigMap",
    )  # fmt: skip
    assert moved["metadata"]["namespace"] == "monitoring"
    assert moved["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert "ConfigMap" not in kinds(objects("--set", "metrics.dashboard.enabled=false"))


def test_every_dashboard_panel_has_queries_on_cpt_metrics_and_a_known_datasource() -> None:
    dash = json.loads((CHART / "dashboards" / "cpt.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 8
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert "cpt_" in t["expr"], (p["title"], t["expr"])
            assert t["datasource"]["uid"] == "${datasource}"
    titles = {p["title"] for p in panels}
    assert {"Runs by phase", "Step progress", "ETA", "Training loss", "Tokens/s"} <= titles
    assert "Checkpoint age" in titles
    names = [a["name"] for a in dash["annotations"]["list"]]
    assert names == ["Training attempts", "Operator restarts"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "metrics.port=80"], "port"),
        (["--set", "metrics.serviceMonitor.interval=soon"], "interval"),
        (["--set", "metrics.dashboard.namespace=Not_A_Namespace"], "namespace"),
        (["--set", "metrics.extra=1"], "additional properties 'extra' not allowed"),
    ],
    ids=["low-port", "bad-interval", "bad-namespace", "unknown-key"],
)
def test_the_schema_rejects_bad_metrics_values(args: list[str], message: str) -> None:
    proc = render.template(*args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
