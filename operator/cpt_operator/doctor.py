"""``cpt doctor RUN.yaml``: check a cluster for what the run needs before the first run.

Each check gives ok, warn or FAIL with one line of detail; any FAIL is a blocker (exit code 1).
The checks (docs/install.md, "Check the cluster"):

* the ContinualPretrain CRD (served at cpt's API version, schema as this cpt generates it) and
  the PyTorchJob CRD (``kubeflow.org/v1`` served);
* a training-operator Deployment with a ready replica;
* nodes of the run's instance type whose allocatable resources include what a training pod
  requests (``aws.amazon.com/neuron``, ``vpc.amazonaws.com/efa``, ``nvidia.com/gpu``): these
  are what the device plugins advertise;
* the namespace's enforced Pod Security level against what the run's pods need;
* the training ServiceAccount and its IRSA annotation (or an S3 credentials Secret);
* the run's S3 prefixes reachable (list, then write and delete a probe object) with the
  credentials doctor runs with (run it in the operator pod to use the operator's);
* enough nodes free right now (Ready, schedulable, device resources unrequested) for
  ``training.nodes``.

Kubernetes reads go through :class:`ClusterReader` (a handful of GET/LIST calls returning
plain dicts, :class:`KubeReader` on the operator's client layer); the checks themselves are
pure functions of those dicts.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cpt_operator.api.models import API_VERSION, GROUP, PLURAL, VERSION, ContinualPretrainSpec
from cpt_operator.api.podsecurity import ENFORCE_LABEL, required_level
from cpt_training.flops import instance_type

Status = Literal["ok", "warn", "FAIL"]
PYTORCHJOB_CRD = "pytorchjobs.kubeflow.org"
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"
INSTANCE_LABEL = "node.kubernetes.io/instance-type"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
TRAINING_OPERATOR_NAMES = ("training-operator", "kubeflow-training-operator")


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


class ClusterReader(Protocol):
    """The Kubernetes reads doctor needs; every object is the API's JSON as a dict."""

    def crd(self, name: str) -> dict[str, Any] | None: ...
    def deployments(self) -> list[dict[str, Any]]: ...
    def nodes(self) -> list[dict[str, Any]]: ...
    def active_pods(self) -> list[dict[str, Any]]: ...
    def namespace(self, name: str) -> dict[str, Any] | None: ...
    def service_account(self, namespace: str, name: str) -> dict[str, Any] | None: ...


class KubeReader:
    """:class:`ClusterReader` over the operator's client layer (:mod:`cpt_operator.kube`, the
    official client's generic request path), from the in-cluster ServiceAccount or the
    kubeconfig (``KUBECONFIG``)."""

    def __init__(self) -> None:
        from cpt_operator import kube

        self._kube = kube.Kube(kube.api_client(pool_size=4))

    @property
    def default_namespace(self) -> str:
        """The in-cluster ServiceAccount's namespace, else the kubeconfig context's
        (``default`` when it names none)."""
        sa_ns = Path(SERVICE_ACCOUNT_NAMESPACE)
        if sa_ns.is_file():
            return sa_ns.read_text().strip() or "default"
        from kubernetes import config

        try:
            _, active = config.list_kube_config_contexts()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            return "default"
        return str((active or {}).get("context", {}).get("namespace") or "default")

    def _get(self, resource: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self._kube.request("GET", resource)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def _list(self, resource: str, query: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        return list(self._kube.request("GET", resource, query=query).get("items") or [])

    def crd(self, name: str) -> dict[str, Any] | None:
        # The JSON as the API server returns it: compared with cpt's own CRD key for key.
        return self._get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")

    def deployments(self) -> list[dict[str, Any]]:
        return self._list("/apis/apps/v1/deployments")

    def nodes(self) -> list[dict[str, Any]]:
        return self._list("/api/v1/nodes")

    def active_pods(self) -> list[dict[str, Any]]:
        return self._list("/api/v1/pods", {"fieldSelector": "status.phase!=Succeeded"})

    def namespace(self, name: str) -> dict[str, Any] | None:
        return self._get(f"/api/v1/namespaces/{name}")

    def service_account(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")


# ---------------------------------------------------------------------------------------------
# Checks (pure)
# ---------------------------------------------------------------------------------------------


def _served(crd: Mapping[str, Any]) -> list[str]:
    return [v["name"] for v in crd.get("spec", {}).get("versions", []) if v.get("served")]


def _established(crd: Mapping[str, Any]) -> bool:
    conds = crd.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conds)


def _numbers_as_floats(node: Any) -> Any:
    """JSON round trips through the API server turn 1.0 into 1 and big integers into floats."""
    if isinstance(node, dict):
        return {k: _numbers_as_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers_as_floats(v) for v in node]
    if isinstance(node, int | float) and not isinstance(node, bool):
        return float(node)
    return node


def _schema(crd: Mapping[str, Any], version: str) -> Any:
    for v in crd.get("spec", {}).get("versions", []):
        if v.get("name") == version:
            return _numbers_as_floats((v.get("schema") or {}).get("openAPIV3Schema"))
    return None


def check_cpt_crd(crd: Mapping[str, Any] | None, expected: Mapping[str, Any]) -> Check:
    name = "ContinualPretrain CRD"
    fix = "kubectl apply --server-side -f charts/cpt/crds/ (or install the chart)"
    if crd is None:
        return Check(name, "FAIL", f"{PLURAL}.{GROUP} is not installed: {fix}")
    if VERSION not in _served(crd) or not _established(crd):
        return Check(name, "FAIL", f"{API_VERSION} is not served and established: {fix}")
    if _schema(crd, VERSION) != _schema(expected, VERSION):
        return Check(name, "warn", f"installed schema differs from this cpt's: {fix}")
    return Check(name, "ok", f"{API_VERSION} served")


def check_pytorchjob_crd(crd: Mapping[str, Any] | None) -> Check:
    name = "PyTorchJob CRD"
    fix = "install the Kubeflow training-operator v1 (docs/install.md)"
    if crd is None:
        return Check(name, "FAIL", f"{PYTORCHJOB_CRD} is not installed: {fix}")
    if "v1" not in _served(crd) or not _established(crd):
        return Check(name, "FAIL", f"kubeflow.org/v1 is not served (served: {_served(crd)}): {fix}")
    return Check(name, "ok", "kubeflow.org/v1 served")


def check_training_operator(deployments: Iterable[Mapping[str, Any]]) -> Check:
    name = "training-operator"
    found = [
        d
        for d in deployments
        if d["metadata"]["name"] in TRAINING_OPERATOR_NAMES
        or d["metadata"].get("labels", {}).get("control-plane") == "kubeflow-training-operator"
    ]
    if not found:
        return Check(
            name, "FAIL", "no training-operator Deployment in any namespace (docs/install.md)"
        )
    ready = [d for d in found if (d.get("status") or {}).get("readyReplicas", 0) >= 1]
    where = ", ".join(f"{d['metadata']['namespace']}/{d['metadata']['name']}" for d in found)
    if not ready:
        return Check(name, "FAIL", f"{where} has no ready replica")
    return Check(name, "ok", f"{where} ready")


def _quantity(value: Any) -> int:
    """Whole-unit extended resources (devices) are plain integers."""
    try:
        return int(str(value))
    except ValueError:
        return 0


def _node_ready(node: Mapping[str, Any]) -> bool:
    conds = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _requested(pods: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """node name -> resource -> units requested by the active pods on it."""
    out: dict[str, dict[str, int]] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        used = out.setdefault(node, {})
        for c in pod["spec"].get("containers") or []:
            req = (c.get("resources") or {}).get("requests") or {}
            for key, value in req.items():
                used[key] = used.get(key, 0) + _quantity(value)
    return out


def check_nodes(
    spec: ContinualPretrainSpec,
    nodes: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
) -> list[Check]:
    """Device plugins (allocatable device resources) and free capacity for ``training.nodes``."""
    inst = instance_type(spec.training.instance_type)
    need = {k: int(v) for k, v in inst.resources.items()}
    of_type = [n for n in nodes if n["metadata"].get("labels", {}).get(INSTANCE_LABEL) == inst.name]
    if not need:
        return [Check("nodes", "ok", f"{inst.name} requests no device resources")]
    if not of_type:
        return [
            Check(
                f"{inst.name} nodes",
                "FAIL",
                f"no node labelled {INSTANCE_LABEL}={inst.name}: create the node group "
                "(examples/eks/) or let an autoscaler add it",
            )
        ]
    checks = []
    for res, count in need.items():
        having = [
            n
            for n in of_type
            if _quantity((n.get("status") or {}).get("allocatable", {}).get(res, 0)) >= count
        ]
        status: Status = "ok" if len(having) == len(of_type) else "FAIL"
        detail = f"{len(having)} of {len(of_type)} {inst.name} nodes allocate {res} >= {count}"
        if status == "FAIL":
            detail += f": install the device plugin advertising {res} (docs/install.md)"
        checks.append(Check(f"device plugin {res}", status, detail))
    used = _requested(pods)
    free = [
        n
        for n in of_type
        if _node_ready(n)
        and not (n.get("spec") or {}).get("unschedulable")
        and all(
            _quantity(n["status"].get("allocatable", {}).get(res, 0))
            - used.get(n["metadata"]["name"], {}).get(res, 0)
            >= count
            for res, count in need.items()
        )
    ]
    want = spec.training.nodes
    checks.append(
        Check(
            "free capacity",
            "ok" if len(free) >= want else "FAIL",
            f"{len(free)} free {inst.name} nodes (Ready, schedulable, devices unrequested), "
            f"the run needs {want}"
            + ("" if len(free) >= want else ": add nodes, or wait for running jobs"),
        )
    )
    return checks


def check_pod_security(
    spec: ContinualPretrainSpec, ns: str, obj: Mapping[str, Any] | None
) -> Check:
    name = "Pod Security"
    if obj is None:
        return Check(name, "FAIL", f"namespace {ns} does not exist: kubectl create namespace {ns}")
    enforced = (obj["metadata"].get("labels") or {}).get(ENFORCE_LABEL, "")
    need = required_level(spec)
    if need.admitted_by(enforced):
        return Check(
            name, "ok", f"{ns} enforces {enforced or 'nothing'}; the run needs {need.level}"
        )
    return Check(
        name,
        "FAIL",
        f"{ns} enforces {enforced!r} but the run needs {need.summary()}: "
        f"kubectl label namespace {ns} {ENFORCE_LABEL}={need.level} --overwrite",
    )


def check_service_account(
    spec: ContinualPretrainSpec, ns: str, sa: Mapping[str, Any] | None
) -> Check:
    name = "ServiceAccount"
    sa_name = spec.runtime.service_account_name
    creds = spec.runtime.s3_credentials_secret_ref is not None
    if sa_name is None:
        if creds:
            return Check(name, "ok", "none set; S3 credentials come from a Secret")
        return Check(
            name,
            "warn",
            "spec.runtime.serviceAccountName is not set: pods get the namespace's default "
            "ServiceAccount and S3 access only from the node's role",
        )
    if sa is None:
        return Check(
            name,
            "FAIL",
            f"ServiceAccount {ns}/{sa_name} does not exist (spec.runtime.serviceAccountName)",
        )
    role = (sa["metadata"].get("annotations") or {}).get(IRSA_ANNOTATION)
    if role:
        return Check(name, "ok", f"{ns}/{sa_name} has IRSA role {role}")
    if creds:
        return Check(name, "ok", f"{ns}/{sa_name} exists; S3 credentials come from a Secret")
    return Check(
        name,
        "warn",
        f"{ns}/{sa_name} has no {IRSA_ANNOTATION} annotation: fine with EKS Pod Identity "
        f"(aws eks list-pod-identity-associations --namespace {ns}), else pods have no S3 access",
    )


def check_s3(uris: Iterable[str], probe: Callable[[str], None]) -> list[Check]:
    """``probe(uri)`` lists the prefix and writes and deletes an object, raising on failure."""
    checks = []
    for uri in dict.fromkeys(uris):
        try:
            probe(uri)
        except Exception as exc:  # any failure is the finding: shown, never raised
            checks.append(Check(f"S3 {uri}", "FAIL", f"{type(exc).__name__}: {exc}"[:300]))
        else:
            checks.append(Check(f"S3 {uri}", "ok", "listed, wrote and deleted a probe object"))
    return checks


def s3_probe(uri: str) -> None:
    """List ``uri`` and write then delete a probe object under it (the run writes there)."""
    from cpt_training.storage import open_storage

    st = open_storage(uri)
    st.list_dirs("")
    key = f".cpt-doctor-{uuid.uuid4().hex[:8]}"
    st.write_bytes(key, b"")
    st.delete(key)


# ---------------------------------------------------------------------------------------------
# Running and printing
# ---------------------------------------------------------------------------------------------


def run_checks(
    spec: ContinualPretrainSpec,
    namespace: str,
    cluster: ClusterReader,
    probe: Callable[[str], None] = s3_probe,
) -> list[Check]:
    from cpt_operator.api.crd import build_crd

    checks = [
        check_cpt_crd(cluster.crd(f"{PLURAL}.{GROUP}"), build_crd()),
        check_pytorchjob_crd(cluster.crd(PYTORCHJOB_CRD)),
        check_training_operator(cluster.deployments()),
    ]
    checks += check_nodes(spec, cluster.nodes(), cluster.active_pods())
    checks.append(check_pod_security(spec, namespace, cluster.namespace(namespace)))
    sa = spec.runtime.service_account_name
    checks.append(
        check_service_account(
            spec, namespace, cluster.service_account(namespace, sa) if sa else None
        )
    )
    uris = [spec.checkpoints.s3_uri, spec.output.s3_uri]
    checks += check_s3((u for u in uris if u), probe)
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'CHECK'.ljust(width)}  STATUS  DETAIL"]
    lines += [f"{c.name.ljust(width)}  {c.status.ljust(6)}  {c.detail}" for c in checks]
    fails = sum(c.status == "FAIL" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    lines.append(f"{fails} blocker(s), {warns} warning(s)")
    return "\n".join(lines) + "\n"


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == "FAIL" for c in checks) else 0
