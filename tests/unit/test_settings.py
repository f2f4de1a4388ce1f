"""The operator's settings (cpt_operator/settings.py) and the chart stay one set of knobs:
every setting is one CPT_* variable the chart sets from one documented, schema-checked
value, with the same default. A knob added on one side only fails here."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import pytest
import yaml
from test_chart import CHART, container, env_of, objects

from cpt_operator.settings import ENV_NAMES, OperatorSettings

pytestmark = pytest.mark.unit

# setting → (its variable, the chart value that sets it, a non-default value to set)
CHART_VALUES: dict[str, tuple[str, str, str]] = {
    "namespaces": ("CPT_WATCH_NAMESPACES", "watchNamespace", "ml-team-a"),
    "resync_seconds": ("CPT_RESYNC_SECONDS", "operator.reconcileIntervalSeconds", "30"),
    "workers": ("CPT_WORKER_LIMIT", "operator.workerLimit", "4"),
    "log_level": ("CPT_LOG_LEVEL", "operator.logLevel", "DEBUG"),
    "posting_level": ("CPT_POSTING_LEVEL", "operator.postingLevel", "ERROR"),
    "liveness_endpoint": ("CPT_LIVENESS_ENDPOINT", "operator.healthPort", "9090"),
    "metrics_port": ("CPT_METRICS_PORT", "metrics.port", "9300"),
    "allow_system_priority_classes": (
        "CPT_ALLOW_SYSTEM_PRIORITY_CLASSES",
        "operator.allowSystemPriorityClasses",
        "true",
    ),
    "allow_host_path_scratch": (
        "CPT_ALLOW_HOST_PATH_SCRATCH",
        "operator.allowHostPathScratch",
        "false",
    ),
}


def _lookup(tree: dict[str, Any], dotted: str, *, schema: bool = False) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node["properties"][part] if schema else node[part]
    return node


def test_every_setting_is_one_variable_and_one_chart_value() -> None:
    assert sorted(f.name for f in fields(OperatorSettings)) == sorted(CHART_VALUES)
    assert sorted(ENV_NAMES) == sorted(v[0] for v in CHART_VALUES.values())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    for _, path, _ in CHART_VALUES.values():
        _lookup(values, path)  # KeyError names a value the chart lacks
        assert _lookup(schema, path, schema=True)["description"]
    rendered = {k for k in env_of(container(objects())) if k.startswith("CPT_")}
    assert rendered == set(ENV_NAMES)


def test_the_charts_defaults_are_the_operators_defaults() -> None:
    env = env_of(container(objects()))
    assert OperatorSettings.from_env(env) == OperatorSettings()


def test_each_chart_value_reaches_its_setting() -> None:
    args = [a for _, path, v in CHART_VALUES.values() for a in ("--set", f"{path}={v}")]
    got = OperatorSettings.from_env(env_of(container(objects(*args))))
    assert got == OperatorSettings(
        namespaces=("ml-team-a",),
        resync_seconds=30,
        workers=4,
        log_level="DEBUG",
        posting_level="ERROR",
        liveness_endpoint="http://0.0.0.0:9090/healthz",
        metrics_port=9300,
        allow_system_priority_classes=True,
        allow_host_path_scratch=False,
    )


def test_a_bad_setting_names_its_variable() -> None:
    with pytest.raises(ValueError, match="CPT_WORKER_LIMIT"):
        OperatorSettings.from_env({"CPT_WORKER_LIMIT": "0"})
    with pytest.raises(ValueError, match="CPT_RESYNC_SECONDS"):
        OperatorSettings.from_env({"CPT_RESYNC_SECONDS": "soon"})
    assert OperatorSettings.from_env({"CPT_LIVENESS_ENDPOINT": ""}).liveness_endpoint is None
