"""``cpt doctor``'s checks as pure functions of what the cluster returns (a dict-serving
stand-in for the Kubernetes reads; the same checks run against the real control plane in
tests/integration/test_doctor.py).

We test these aspects:
- A bare cluster (no CRDs, no operator, no nodes, no namespace) fails every cluster check,
  each naming the fix; the exit code is 1.
- An installed CRD whose schema differs from this cpt's is a warning, not a blocker.
- A ServiceAccount without an IRSA annotation warns (Pod Identity is invisible to the API),
  a static-credentials Secret makes it ok; a missing one is a blocker.
- Nodes: requested device units count against free capacity; a cordoned node is not free.
- The S3 probe's exception becomes a FAIL row with its class and message.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_operator import doctor
from cpt_operator.api.crd import build_crd
from cpt_operator.api.models import ContinualPretrainSpec

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TRN1 = {"aws.amazon.com/neuron": "16", "vpc.amazonaws.com/efa": "8", "cpu": "128"}


def seed_spec(**runtime: Any) -> ContinualPretrainSpec:
    body = yaml.safe_load((ROOT / "examples" / "run.yaml").read_text())["spec"]
    body["training"].update(nodes=2, tensorParallel=8, pipelineParallel=8)
    body["runtime"].update(runtime)
    return ContinualPretrainSpec.model_validate(body)


def node(name: str, alloc: dict[str, str], *, cordoned: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {doctor.INSTANCE_LABEL: "trn1.32xlarge"}},
        "spec": {"unschedulable": cordoned},
        "status": {"allocatable": alloc, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def pod_on(node_name: str, neuron: int) -> dict[str, Any]:
    req = {"aws.amazon.com/neuron": str(neuron)}
    return {
        "spec": {"nodeName": node_name, "containers": [{"resources": {"requests": req}}]},
        "status": {"phase": "Running"},
    }


class Reader:
    def __init__(self, **objs: Any) -> None:
        self.objs = objs

    def crd(self, name: str) -> dict[str, Any] | None:
        return self.objs.get("crds", {}).get(name)

    def deployments(self) -> list[dict[str, Any]]:
        return self.objs.get("deployments", [])

    def nodes(self) -> list[dict[str, Any]]:
        return self.objs.get("nodes", [])

    def active_pods(self) -> list[dict[str, Any]]:
        return self.objs.get("pods", [])

    def namespace(self, name: str) -> dict[str, Any] | None:
        return self.objs.get("namespaces", {}).get(name)

    def service_account(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objs.get("sas", {}).get(name)


def rows(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_a_bare_cluster_fails_every_check_with_its_fix() -> None:
    checks = doctor.run_checks(seed_spec(), "ml", Reader(), probe=lambda uri: None)
    r = rows(checks)
    assert "kubectl apply --server-side -f charts/cpt/crds/" in r["ContinualPretrain CRD"].detail
    assert "training-operator" in r["PyTorchJob CRD"].detail
    for name in ("ContinualPretrain CRD", "PyTorchJob CRD", "training-operator"):
        assert r[name].status == "FAIL"
    assert r["trn1.32xlarge nodes"].status == "FAIL"
    assert "kubectl create namespace ml" in r["Pod Security"].detail
    assert r["ServiceAccount"].status == "FAIL"
    assert doctor.exit_code(checks) == 1
    text = doctor.render(checks)
    assert text.splitlines()[0].startswith("CHECK") and "blocker(s)" in text.splitlines()[-1]


def test_a_crd_with_another_schema_is_a_warning() -> None:
    crd = copy.deepcopy(build_crd())
    crd["status"] = {"conditions": [{"type": "Established", "status": "True"}]}
    assert doctor.check_cpt_crd(crd, build_crd()).status == "ok"
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] = "older"
    assert doctor.check_cpt_crd(crd, build_crd()).status == "warn"


def test_service_account_irsa_pod_identity_and_secrets() -> None:
    spec = seed_spec()
    assert doctor.check_service_account(spec, "ml", None).status == "FAIL"
    bare = {"metadata": {"name": "cpt-training"}}
    assert doctor.check_service_account(spec, "ml", bare).status == "warn"
    irsa = {"metadata": {"annotations": {doctor.IRSA_ANNOTATION: "arn:aws:iam::1:role/x"}}}
    assert doctor.check_service_account(spec, "ml", irsa).status == "ok"
    with_secret = seed_spec(s3CredentialsSecretRef={"name": "s3-keys"})
    assert doctor.check_service_account(with_secret, "ml", bare).status == "ok"


def test_requested_devices_and_cordoned_nodes_are_not_free_capacity() -> None:
    spec = seed_spec()
    nodes = [node("a", TRN1), node("b", TRN1), node("c", TRN1, cordoned=True)]
    checks = rows(doctor.check_nodes(spec, nodes, [pod_on("a", 16)]))
    assert checks["device plugin aws.amazon.com/neuron"].status == "ok"
    assert checks["free capacity"].status == "FAIL" and "1 free" in checks["free capacity"].detail
    checks = rows(doctor.check_nodes(spec, [*nodes, node("d", TRN1)], [pod_on("a", 16)]))
    assert checks["free capacity"].status == "ok"
    no_efa = rows(doctor.check_nodes(spec, [node("e", {"aws.amazon.com/neuron": "16"})], []))
    assert no_efa["device plugin vpc.amazonaws.com/efa"].status == "FAIL"


def test_an_s3_error_is_a_fail_row() -> None:
    def probe(uri: str) -> None:
        raise PermissionError(f"AccessDenied on {uri}")

    (check,) = doctor.check_s3(["s3://b/x/", "s3://b/x/"], probe)
    assert check.status == "FAIL" and "PermissionError: AccessDenied on s3://b/x/" in check.detail
