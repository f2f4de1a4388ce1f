"""The cpt chart installed with helm on the local control plane.

These tests check the mechanics against a real API server with RBAC on: install, upgrade,
uninstall (the CRD stays), the schema rejecting bad values before anything is created, and
what the operator's ServiceAccount is and is not allowed to do in both namespace modes. That
the granted rights are *enough* to run a ContinualPretrain is proven in tests/e2e/test_rbac.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.cluster import Cluster, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cpt"
CRD_NAME = "continualpretrains.cpt.dev"

# (verb, resource, subresource) the operator needs in a namespace it serves.
NAMESPACED_ALLOWED = [
    ("get", "continualpretrains.cpt.dev", ""),
    ("watch", "continualpretrains.cpt.dev", ""),
    ("list", "continualpretrains.cpt.dev", ""),
    ("patch", "continualpretrains.cpt.dev", "status"),
    ("update", "continualpretrains.cpt.dev", "finalizers"),
    ("create", "jobs.batch", ""),
    ("delete", "jobs.batch", ""),
    ("create", "pytorchjobs.kubeflow.org", ""),
    ("delete", "pytorchjobs.kubeflow.org", ""),
    ("list", "pods", ""),
    ("delete", "pods", ""),
    ("create", "events", ""),
]
# ... and must never get, in any namespace.
NAMESPACED_DENIED = [
    ("get", "secrets", ""),
    ("list", "secrets", ""),
    ("get", "configmaps", ""),
    ("create", "pods", ""),
    ("create", "pods", "exec"),
    ("get", "pods", "log"),
    ("create", "continualpretrains.cpt.dev", ""),
    ("patch", "continualpretrains.cpt.dev", ""),
    ("update", "continualpretrains.cpt.dev", ""),
    ("delete", "continualpretrains.cpt.dev", ""),
    ("update", "continualpretrains.cpt.dev", "status"),
    ("update", "jobs.batch", ""),
    ("patch", "pytorchjobs.kubeflow.org", ""),
    ("create", "serviceaccounts", "token"),
    ("create", "rolebindings.rbac.authorization.k8s.io", ""),
]
CLUSTER_ALLOWED = [
    ("list", "nodes", ""),
    ("watch", "nodes", ""),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("get", "namespaces", ""),  # the Pod Security label of a run's namespace
]
CLUSTER_DENIED = [
    ("patch", "nodes", ""),
    ("delete", "nodes", ""),
    ("patch", "nodes", "status"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("create", "clusterroles.rbac.authorization.k8s.io", ""),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", ""),
    ("bind", "clusterroles.rbac.authorization.k8s.io", ""),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", ""),
    ("impersonate", "users", ""),
    ("impersonate", "serviceaccounts", ""),
    ("create", "namespaces", ""),
    ("delete", "namespaces", ""),
]
# kopf reads namespaces only when it serves named ones.
NAMESPACES_READ = [("list", "namespaces", ""), ("watch", "namespaces", "")]


def can_i(
    cluster: Cluster, sa: str, verb: str, resource: str, sub: str = "", namespace: str = ""
) -> bool:
    """`kubectl auth can-i` as the ServiceAccount (a SubjectAccessReview on the server)."""
    args = ["auth", "can-i", verb, resource, f"--as={sa}"]
    if sub:
        args.append(f"--subresource={sub}")
    if namespace:  # cluster-scoped checks pass none
        args.append(f"--namespace={namespace}")
    proc = cluster.kubectl(*args, check=False)
    answer = str(proc.stdout).strip()
    assert answer in {"yes", "no"}, proc.stdout + proc.stderr
    return answer == "yes"


def rights(
    cluster: Cluster, sa: str, table: list[tuple[str, str, str]], namespace: str = ""
) -> dict[str, bool]:
    return {
        f"{verb} {res}{'/' + sub if sub else ''}": can_i(cluster, sa, verb, res, sub, namespace)
        for verb, res, sub in table
    }


def make_namespace(cluster: Cluster, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.api.create(
        "/api/v1/namespaces",
        {"metadata": {"name": name, "labels": {"cpt.dev/test": "true"}}},
        exist_ok=False,
    )
    return name


@pytest.fixture
def other_namespace(cluster: Cluster) -> Iterator[str]:
    name = make_namespace(cluster, "t-chart-other")
    yield name
    cluster.api.delete(f"/api/v1/namespaces/{name}")


class Release:
    """One helm release of the chart, uninstalled at the end of the test."""

    def __init__(self, cluster: Cluster, namespace: str, *values: str) -> None:
        self.cluster, self.namespace, self.name = cluster, namespace, "cpt"
        self.sa = f"system:serviceaccount:{namespace}:cpt"
        self.notes = ""
        self.install(*values)

    def install(self, *values: str) -> None:
        proc = self.cluster.helm(
            "install", self.name, str(CHART), "--namespace", self.namespace, *values
        )
        self.notes = proc.stdout.split("NOTES:", 1)[1] if "NOTES:" in proc.stdout else ""

    def manifest(self) -> list[dict[str, Any]]:
        import yaml

        out = self.cluster.helm("get", "manifest", self.name, "--namespace", self.namespace)
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    def uninstall(self) -> None:
        self.cluster.helm("uninstall", self.name, "--namespace", self.namespace, "--wait")


@pytest.fixture
def install(cluster: Cluster, namespace: str) -> Iterator[Any]:
    releases: list[Release] = []

    def _install(*values: str) -> Release:
        rel = Release(cluster, namespace, *values)
        releases.append(rel)
        return rel

    yield _install
    for rel in releases:
        rel.cluster.helm("uninstall", rel.name, "--namespace", rel.namespace, check=False)


def get_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_helm_install_creates_the_operator_its_identity_and_its_cluster_role(
    cluster: Cluster, namespace: str, install: Any
) -> None:
    rel = install()
    dep = get_json(cluster, "deployment", "cpt", "-n", namespace)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "cpt"
    env = {e["name"]: e.get("value", "") for e in pod["containers"][0]["env"]}
    assert env["CPT_WATCH_NAMESPACES"] == ""
    get_json(cluster, "serviceaccount", "cpt", "-n", namespace)
    role = get_json(cluster, "clusterrole", f"{namespace}-cpt")
    assert role["metadata"]["labels"]["app.kubernetes.io/instance"] == "cpt"
    binding = get_json(cluster, "clusterrolebinding", f"{namespace}-cpt")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cpt", "namespace": namespace}
    ]
    assert get_json(cluster, "crd", CRD_NAME)["spec"]["group"] == "cpt.dev"
    # KWOK runs the pod on a fake CPU node; the Deployment becomes available.
    cluster.kubectl("rollout", "status", "deployment/cpt", "-n", namespace, "--timeout=90s")
    assert "kubectl apply -f examples/run.yaml" in rel.notes
    assert "kubectl get cpt -A -w" in rel.notes
    assert "docs/install.md" in rel.notes
    assert "WARNING" not in rel.notes  # the CRD was found


def test_helm_upgrade_keeps_the_selector_and_applies_new_values(
    cluster: Cluster, namespace: str, install: Any
) -> None:
    install()
    before = get_json(cluster, "deployment", "cpt", "-n", namespace)
    cluster.helm(
        "upgrade", "cpt", str(CHART), "--namespace", namespace, "--reuse-values",
        "--set", "operator.logLevel=DEBUG", "--set", "image.tag=0.1.1",
    )  # fmt: skip
    after = get_json(cluster, "deployment", "cpt", "-n", namespace)
    assert after["spec"]["selector"] == before["spec"]["selector"]
    env = {
        e["name"]: e.get("value") for e in after["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["CPT_LOG_LEVEL"] == "DEBUG"
    labels = after["metadata"]["labels"]
    assert labels["app.kubernetes.io/version"] == "0.1.1"


def test_helm_uninstall_removes_the_operator_but_keeps_the_crd(
    cluster: Cluster, namespace: str, install: Any
) -> None:
    rel = install()
    rel.uninstall()
    gone = cluster.kubectl("get", "clusterrole", f"{namespace}-cpt", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    gone = cluster.kubectl("get", "deployment", "cpt", "-n", namespace, check=False)
    assert gone.returncode != 0
    assert get_json(cluster, "crd", CRD_NAME)["metadata"]["name"] == CRD_NAME


def test_an_unknown_value_fails_the_install_before_anything_is_created(
    cluster: Cluster, namespace: str
) -> None:
    proc = cluster.helm(
        "install", "cpt", str(CHART), "--namespace", namespace, "--set", "replicas=2",
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "additional properties 'replicas' not allowed" in proc.stderr
    assert cluster.kubectl("get", "deployment", "cpt", "-n", namespace, check=False).returncode
    assert cluster.helm("status", "cpt", "--namespace", namespace, check=False).returncode


def test_in_all_namespaces_mode_the_operator_gets_exactly_its_rights_everywhere(
    cluster: Cluster, namespace: str, other_namespace: str, install: Any
) -> None:
    rel = install()
    for ns in (namespace, other_namespace):
        allowed = rights(cluster, rel.sa, NAMESPACED_ALLOWED, ns)
        assert allowed == dict.fromkeys(allowed, True)
        denied = rights(cluster, rel.sa, NAMESPACED_DENIED, ns)
        assert denied == dict.fromkeys(denied, False)
    allowed = rights(cluster, rel.sa, CLUSTER_ALLOWED)
    assert allowed == dict.fromkeys(allowed, True)
    denied = rights(cluster, rel.sa, CLUSTER_DENIED + NAMESPACES_READ)
    assert denied == dict.fromkeys(denied, False)


def test_in_one_namespace_mode_the_operator_has_no_rights_elsewhere(
    cluster: Cluster, namespace: str, other_namespace: str, install: Any
) -> None:
    # The operator lives in `namespace` and serves `other_namespace` only.
    rel = install("--set", f"watchNamespace={other_namespace}")
    role = get_json(cluster, "role", "cpt", "-n", other_namespace)
    assert role["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    served = rights(cluster, rel.sa, NAMESPACED_ALLOWED, other_namespace)
    assert served == dict.fromkeys(served, True)
    for ns in (namespace, "default", "kube-system"):
        elsewhere = rights(cluster, rel.sa, NAMESPACED_ALLOWED + NAMESPACED_DENIED, ns)
        assert elsewhere == dict.fromkeys(elsewhere, False), ns
    allowed = rights(cluster, rel.sa, CLUSTER_ALLOWED + NAMESPACES_READ)
    assert allowed == dict.fromkeys(allowed, True)
    denied = rights(cluster, rel.sa, CLUSTER_DENIED)
    assert denied == dict.fromkeys(denied, False)
    assert f"kubectl apply -n {other_namespace} -f examples/run.yaml" in rel.notes
    rel.uninstall()
    gone = cluster.kubectl("get", "role", "cpt", "-n", other_namespace, check=False)
    assert gone.returncode != 0


def test_two_single_namespace_releases_with_one_name_coexist(
    cluster: Cluster, namespace: str, other_namespace: str, install: Any
) -> None:
    first = install("--set", f"watchNamespace={namespace}")
    second = Release(cluster, other_namespace, "--set", f"watchNamespace={other_namespace}")
    try:
        assert can_i(cluster, first.sa, "create", "jobs.batch", "", namespace)
        assert not can_i(cluster, first.sa, "create", "jobs.batch", "", other_namespace)
        assert can_i(cluster, second.sa, "create", "jobs.batch", "", other_namespace)
        assert not can_i(cluster, second.sa, "create", "jobs.batch", "", namespace)
    finally:
        second.uninstall()
    wait_for(
        lambda: (
            cluster.kubectl("get", "clusterrole", f"{other_namespace}-cpt", check=False).returncode
            != 0
        ),
        timeout=30,
        what="the second release's ClusterRole to go",
    )
    assert can_i(cluster, first.sa, "list", "nodes")
