"""The cpt Helm chart: lint, schema, golden renders and targeted checks of what it renders.

Renders go through the pinned helm (hack/chart/render.py finds it). Golden files live in
tests/golden/chart/; regenerate them with `CPT_UPDATE_GOLDEN=1 pytest tests/unit/test_chart.py`
and review the diff.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cpt"
GOLDEN = REPO / "tests" / "golden" / "chart"
IRSA_ARN = "arn:aws:iam::111122223333:role/cpt-operator"


def _load(name: str) -> ModuleType:
    path = REPO / "hack" / "chart" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"cpt_hack_chart_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render = _load("render")
values_schema = _load("values_schema")

try:
    render.find_helm()
except render.HelmNotFound as exc:  # pragma: no cover - depends on the machine
    pytest.skip(str(exc), allow_module_level=True)


def objects(*args: str, **kwargs: Any) -> list[dict[str, Any]]:
    return list(render.render_objects(*args, **kwargs))


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["operator"]
    return dict(pod["containers"][0])


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# ---------------------------------------------------------------- lint and schema


@pytest.mark.parametrize("extra", [[], ["--set", "watchNamespace=team-a"]], ids=["all", "one-ns"])
def test_helm_lint_passes_in_strict_mode(extra: list[str]) -> None:
    proc = render.helm("lint", "--strict", str(CHART), *extra, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_values_schema_json_matches_what_values_yaml_generates() -> None:
    committed = (CHART / "values.schema.json").read_text()
    generated = values_schema.render(values_schema.generate(CHART))
    assert committed == generated, "stale schema: run python hack/chart/values_schema.py"


def test_the_schema_closes_every_object_it_describes() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        if "properties" in node:
            if node.get("additionalProperties") is not False:
                open_objects.append(path or "<root>")
            for key, sub in node["properties"].items():
                walk(sub, f"{path}.{key}")

    walk(schema, "")
    assert open_objects == []


def test_the_schema_generator_refuses_a_key_without_a_comment(tmp_path: Path) -> None:
    (tmp_path / "values.yaml").write_text("# The image.\nimage:\n  tag: x\n")
    with pytest.raises(values_schema.ValuesDocError, match=r"image\.tag"):
        values_schema.generate(tmp_path)


def test_the_schema_generator_check_mode_reports_drift(tmp_path: Path) -> None:
    (tmp_path / "values.yaml").write_text('# How many.\n# @schema {"const": 1}\nn: 1\n')
    (tmp_path / "values.schema.json").write_text("{}\n")
    assert values_schema.main(["--check", "--chart", str(tmp_path)]) == 1
    assert values_schema.main(["--chart", str(tmp_path)]) == 0
    assert values_schema.main(["--check", "--chart", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "values.schema.json").read_text())
    assert written["properties"]["n"] == {"description": "How many.", "const": 1}


def _value_paths(node: Any, path: tuple[str, ...], docs: dict[Any, Any]) -> list[str]:
    doc = docs.get(path)
    if isinstance(node, dict) and node and (doc is None or doc.schema is None):
        out: list[str] = []
        for key, sub in node.items():
            out += _value_paths(sub, (*path, key), docs)
        return out
    return [".".join(path)]


def test_every_value_is_used_by_a_template() -> None:
    text = (CHART / "values.yaml").read_text()
    paths = _value_paths(yaml.safe_load(text), (), values_schema.parse_key_docs(text))
    used = set()
    for tpl in (CHART / "templates").iterdir():
        used |= set(re.findall(r"\.Values((?:\.[A-Za-z0-9_]+)+)", tpl.read_text()))
    used_paths = {u.lstrip(".") for u in used}
    unused = [p for p in paths if not any(p == u or p.startswith(u + ".") for u in used_paths)]
    assert unused == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "foo=bar"], "additional properties 'foo' not allowed"),
        (["--set", "image.tagg=1"], "additional properties 'tagg' not allowed"),
        (["--set", "replicaCount=2"], "replicaCount"),
        (["--set", "operator.logLevel=LOUD"], "logLevel"),
        (["--set", "operator.reconcileIntervalSeconds=0"], "reconcileIntervalSeconds"),
        (["--set", "watchNamespace=Not_A_Namespace"], "watchNamespace"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    ],
    ids=[
        "unknown-top-key",
        "unknown-nested-key",
        "two-replicas",
        "bad-log-level",
        "zero-interval",
        "bad-ns",
        "bad-pull-policy",
    ],
)
def test_the_schema_rejects_bad_values_and_names_the_field(args: list[str], message: str) -> None:
    proc = render.template(*args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------- golden renders

CASES: dict[str, list[str]] = {
    "default": [],
    "watch-namespace": ["--set", "watchNamespace=ml-team-a"],
    "irsa": [
        "--set", f"serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn={IRSA_ARN}",
        "--set", "s3.region=us-west-2",
    ],
    # The Prometheus Operator's CRDs installed: the ServiceMonitor renders too.
    "servicemonitor": [
        "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor",
        "--set", "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
    ],
    "metrics-off": ["--set", "metrics.enabled=false"],
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_render_matches_its_golden_file(case: str) -> None:
    got = render.template(*CASES[case]).stdout
    golden = GOLDEN / f"{case}.yaml"
    if os.environ.get("CPT_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(got)
    want = golden.read_text()
    diff = "".join(
        difflib.unified_diff(want.splitlines(True), got.splitlines(True), "golden", "now")
    )
    assert got == want, f"{golden} differs (CPT_UPDATE_GOLDEN=1 to accept):\n{diff}"


# ---------------------------------------------------------------- the Deployment


def test_the_operator_runs_one_replica_with_the_recreate_strategy() -> None:
    dep = one(objects(), "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}


def test_the_pod_and_container_meet_the_restricted_pod_security_standard() -> None:
    objs = objects()
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(objs)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")


def test_a_writable_tmp_is_mounted_because_the_root_filesystem_is_read_only() -> None:
    objs = objects("--set", "tmpSizeLimit=32Mi")
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container(objs)["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "32Mi"}} in pod["volumes"]


def test_liveness_probes_kopfs_healthz_on_the_port_kopf_serves() -> None:
    c = container(objects("--set", "operator.healthPort=9090"))
    assert env_of(c)["CPT_LIVENESS_ENDPOINT"] == "http://0.0.0.0:9090/healthz"
    assert c["ports"][0] == {"name": "healthz", "containerPort": 9090, "protocol": "TCP"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert "readinessProbe" not in c


def test_the_optional_readiness_probe_uses_the_same_endpoint() -> None:
    c = container(objects("--set", "operator.readinessProbe.enabled=true"))
    assert c["readinessProbe"]["httpGet"] == c["livenessProbe"]["httpGet"]


def test_the_operator_watches_all_namespaces_by_default_and_one_when_asked() -> None:
    c = container(objects())
    assert c["command"] == ["python", "-m", "cpt_operator"]
    assert env_of(c)["CPT_WATCH_NAMESPACES"] == ""
    c = container(objects("--set", "watchNamespace=ml-team-a"))
    assert env_of(c)["CPT_WATCH_NAMESPACES"] == "ml-team-a"


def test_operator_settings_reach_the_container_as_env() -> None:
    c = container(
        objects(
            "--set", "operator.logLevel=DEBUG", "--set", "operator.workerLimit=4",
            "--set", "operator.postingLevel=WARNING",
            "--set", "operator.reconcileIntervalSeconds=30",
        )
    )  # fmt: skip
    env = env_of(c)
    assert env["CPT_LOG_LEVEL"] == "DEBUG"
    assert env["CPT_WORKER_LIMIT"] == "4"
    assert env["CPT_POSTING_LEVEL"] == "WARNING"
    assert env["CPT_RESYNC_SECONDS"] == "30"


def test_every_operator_setting_the_chart_passes_is_read_by_the_operator() -> None:
    """The chart and the operator agree on the env names (a renamed variable would otherwise
    turn a documented value into a silent no-op)."""
    names = {k for k in env_of(container(objects())) if k.startswith("CPT_")}
    assert names
    source = "\n".join(p.read_text() for p in (REPO / "operator" / "cpt_operator").rglob("*.py"))
    unread = sorted(n for n in names if f'"{n}"' not in source)
    assert unread == [], f"the operator never reads {unread}"


def test_s3_settings_become_standard_aws_env_and_secrets_stay_references() -> None:
    env = env_of(container(objects()))
    assert not any(k.startswith("AWS_") for k in env)
    env = env_of(
        container(
            objects(
                "--set", "s3.region=eu-west-1", "--set", "s3.endpointUrl=http://minio.s3:9000",
                "--set", "s3.credentialsSecret=s3-creds",
            )
        )
    )  # fmt: skip
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio.s3:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"secretKeyRef": {"name": "s3-creds", "key": key}}


def test_image_defaults_to_the_app_version_and_a_digest_pins_it() -> None:
    assert container(objects())["image"] == "ghcr.io/cpt-dev/cpt-operator:0.1.0"
    digest = "sha256:" + "ab" * 32
    c = container(objects("--set", f"image.digest={digest}", "--set", "image.tag=9.9.9"))
    assert c["image"] == f"ghcr.io/cpt-dev/cpt-operator@{digest}"


def test_scheduling_values_reach_the_pod() -> None:
    objs = objects(
        "--set", "priorityClassName=system-cluster-critical",
        "--set", "nodeSelector.kubernetes\\.io/os=linux",
        "--set", "tolerations[0].key=dedicated", "--set", "tolerations[0].operator=Exists",
        "--set", "imagePullSecrets[0].name=regcred",
    )  # fmt: skip
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]


# ---------------------------------------------------------------- names and labels

RECOMMENDED = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "helm.sh/chart",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_object_carries_the_recommended_labels(case: str) -> None:
    for obj in objects(*CASES[case], "--set", "commonLabels.team=ml"):
        labels = obj["metadata"]["labels"]
        assert set(labels) >= RECOMMENDED, obj["metadata"]["name"]
        assert labels["app.kubernetes.io/component"] == "operator"
        assert labels["app.kubernetes.io/part-of"] == "cpt"
        assert labels["team"] == "ml"


def test_the_selector_has_only_name_instance_and_component() -> None:
    dep = one(objects(), "Deployment")
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/name": "cpt",
        "app.kubernetes.io/instance": "cpt",
        "app.kubernetes.io/component": "operator",
    }
    template_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()


def test_user_labels_cannot_override_the_selector_labels() -> None:
    dep = one(
        objects(
            "--set", "commonLabels.app\\.kubernetes\\.io/name=other",
            "--set", "podLabels.app\\.kubernetes\\.io/instance=other", "--set", "podLabels.x=y",
        ),
        "Deployment",
    )  # fmt: skip
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "cpt"
    assert labels["app.kubernetes.io/instance"] == "cpt"
    assert labels["x"] == "y"


def test_names_are_truncated_to_63_characters() -> None:
    release = "r" * 53  # the helm limit; "<release>-cpt" would be 57
    for obj in objects("--set", "nameOverride=" + "n" * 20, release=release):
        if obj["kind"] in {"Deployment", "ServiceAccount"}:
            assert len(obj["metadata"]["name"]) <= 63
            assert not obj["metadata"]["name"].endswith("-")


def test_a_release_named_like_the_chart_is_not_doubled() -> None:
    assert one(objects(release="cpt"), "Deployment")["metadata"]["name"] == "cpt"
    assert one(objects(release="prod"), "Deployment")["metadata"]["name"] == "prod-cpt"
    assert one(objects("--set", "fullnameOverride=op"), "Deployment")["metadata"]["name"] == "op"


# ---------------------------------------------------------------- ServiceAccount and RBAC


def test_the_irsa_annotation_lands_on_the_service_account_the_pod_uses() -> None:
    objs = objects(*CASES["irsa"])
    sa = one(objs, "ServiceAccount")
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": IRSA_ARN}
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]


def test_an_existing_service_account_can_be_used_instead() -> None:
    objs = objects("--set", "serviceAccount.create=false", "--set", "serviceAccount.name=mine")
    assert [o for o in objs if o["kind"] == "ServiceAccount"] == []
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"
    assert one(objs, "ClusterRoleBinding")["subjects"][0]["name"] == "mine"


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


NAMESPACED_GRANTS = {
    *(("cpt.dev", "continualpretrains", v) for v in ("get", "list", "watch")),
    *(("cpt.dev", "continualpretrains/status", v) for v in ("get", "patch")),
    ("cpt.dev", "continualpretrains/finalizers", "update"),
    *(("batch", "jobs", v) for v in ("get", "list", "watch", "create", "delete")),
    *(("kubeflow.org", "pytorchjobs", v) for v in ("get", "list", "watch", "create", "delete")),
    ("kueue.x-k8s.io", "workloads", "list"),  # Kueue's reason for a queued training job
    *(("", "pods", v) for v in ("get", "list", "watch", "delete")),
    ("", "events", "create"),
}
CLUSTER_GRANTS = {
    *(("", "nodes", v) for v in ("get", "list", "watch")),
    *(("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")),
    ("", "namespaces", "get"),  # the Pod Security label of a run's namespace
}


def test_all_namespaces_mode_grants_exactly_the_operators_needs_in_one_cluster_role() -> None:
    objs = objects()
    assert [o for o in objs if o["kind"] in {"Role", "RoleBinding"}] == []
    role = one(objs, "ClusterRole")
    assert _grants(role["rules"]) == NAMESPACED_GRANTS | CLUSTER_GRANTS  # no namespace lists
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cpt", "namespace": "cpt-system"}
    ]


def test_one_namespace_mode_keeps_namespaced_rights_in_that_namespace() -> None:
    objs = objects("--set", "watchNamespace=ml-team-a")
    role, binding = one(objs, "Role"), one(objs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "ml-team-a"
    assert _grants(role["rules"]) == NAMESPACED_GRANTS
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cpt", "namespace": "cpt-system"}
    ]
    namespaces = {("", "namespaces", "list"), ("", "namespaces", "watch")}
    assert _grants(one(objs, "ClusterRole")["rules"]) == CLUSTER_GRANTS | namespaces


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_rule_touches_secrets_or_uses_wildcards_or_escalation_verbs(case: str) -> None:
    for obj in objects(*CASES[case]):
        for rule in obj.get("rules", []):
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (obj["metadata"]["name"], rule)
            assert "secrets" not in rule["resources"]
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule


def test_rbac_can_be_left_to_the_user() -> None:
    kinds = {o["kind"] for o in objects("--set", "rbac.create=false")}
    assert kinds == {"ServiceAccount", "Deployment", "Service", "ConfigMap"}  # + metrics


def test_cluster_scoped_rbac_names_include_the_release_namespace() -> None:
    a = one(objects(namespace="team-a"), "ClusterRole")["metadata"]["name"]
    b = one(objects(namespace="team-b"), "ClusterRole")["metadata"]["name"]
    assert a != b


# ---------------------------------------------------------------- CRDs


def test_the_chart_ships_the_generated_crd_in_crds() -> None:
    crd_file = CHART / "crds" / "cpt.dev_continualpretrains.yaml"
    if not crd_file.exists():
        pytest.fail(f"{crd_file} missing: run `make crds`")
    crd = yaml.safe_load(crd_file.read_text())
    assert crd["metadata"]["name"] == "continualpretrains.cpt.dev"
    rendered = objects("--include-crds")
    assert one(rendered, "CustomResourceDefinition")["metadata"]["name"] == crd["metadata"]["name"]
    assert [o for o in objects() if o["kind"] == "CustomResourceDefinition"] == []
