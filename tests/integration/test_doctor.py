"""``cpt doctor`` against the local control plane, with KWOK nodes of an instance type the
shared inventory does not have (trn1n.32xlarge), with and without the device resources the
Neuron and EFA device plugins advertise, and the loopback S3 server.

We test these aspects:
- On a cluster missing the prerequisites, doctor exits 1 and names each one it is shown: no
  training-operator Deployment, a node without the device resources (each plugin's resource
  named), too few free nodes, a namespace enforcing "restricted" (with the label to use), a
  missing ServiceAccount, an unreachable bucket.
- Once each is provided (nodes with the resources, a ready training-operator Deployment, a
  privileged namespace, a ServiceAccount with an IRSA annotation, an existing bucket) doctor
  exits 0 and says ok for every check.
- The CRD checks read the real CRDs (ContinualPretrain applied from crds/, PyTorchJob from
  the training operator's bootstrap).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.harness import install_crd

from cpt_operator import cli
from fixtures.cluster import REPO, Cluster, devcluster, wait_for
from fixtures.s3 import S3Server

pytestmark = pytest.mark.integration

TAINT = "cpt.dev/doctor-test"
NEURON = {
    "cpu": "128",
    "memory": "512Gi",
    "pods": "250",
    "aws.amazon.com/neuron": "16",
    "aws.amazon.com/neuroncore": "32",
    "vpc.amazonaws.com/efa": "16",
}
BARE = {"cpu": "128", "memory": "512Gi", "pods": "250"}


def write_run(tmp: Path, namespace: str, bucket: str) -> Path:
    body = yaml.safe_load((REPO / "examples" / "run.yaml").read_text())
    body["metadata"]["namespace"] = namespace
    spec = body["spec"]
    spec["training"].update(
        instanceType="trn1n.32xlarge", nodes=1, tensorParallel=8, pipelineParallel=4
    )
    spec["checkpoints"]["s3Uri"] = f"s3://{bucket}/doctor/checkpoints/"
    spec["output"]["s3Uri"] = f"s3://{bucket}/doctor/hf-model/"
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def add_node(cluster: Cluster, name: str, resources: dict[str, str]) -> None:
    node = devcluster._node(
        name,
        "trn1n.32xlarge",
        resources,
        taints=[{"key": TAINT, "value": "true", "effect": "NoSchedule"}],
    )
    cluster.api.create("/api/v1/nodes", node)
    wait_for(lambda: cluster.node_ready(name), timeout=30, what=f"node {name} Ready")


def training_operator(namespace: str, node: str) -> dict[str, Any]:
    labels = {"control-plane": "kubeflow-training-operator"}
    return {
        "metadata": {"name": "training-operator", "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeName": node,
                    "tolerations": [{"key": TAINT, "operator": "Exists"}],
                    "containers": [{"name": "manager", "image": "kubeflow/training-operator:v1"}],
                },
            },
        },
    }


def doctor(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str]]:
    code = cli.main(["doctor", str(path)])
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines()[1:-1]:
        name, rest = line.split("  ", 1)
        rows[name.strip()] = rest.strip()
    return code, rows


def test_doctor_names_each_missing_prerequisite_then_passes_once_they_exist(
    cluster: Cluster,
    namespace: str,
    s3_env: S3Server,
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    install_crd(cluster)
    api = cluster.api
    suffix = uuid.uuid4().hex[:6]
    bare, full = f"doctor-bare-{suffix}", f"doctor-full-{suffix}"
    api.patch(
        f"/api/v1/namespaces/{namespace}",
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
    )
    missing_bucket = write_run(tmp_path, namespace, f"no-such-bucket-{suffix}")
    try:
        add_node(cluster, bare, BARE)
        code, rows = doctor(missing_bucket, capsys)
        assert code == 1
        assert rows["ContinualPretrain CRD"].startswith("ok")
        assert rows["PyTorchJob CRD"].startswith("ok")
        assert rows["training-operator"].startswith("FAIL")
        for res in ("aws.amazon.com/neuron", "vpc.amazonaws.com/efa"):
            line = rows[f"device plugin {res}"]
            assert line.startswith("FAIL") and "0 of 1 trn1n.32xlarge nodes" in line, line
        assert rows["free capacity"].startswith("FAIL")
        assert "pod-security.kubernetes.io/enforce=privileged" in rows["Pod Security"]
        assert (
            rows["ServiceAccount"].startswith("FAIL") and "cpt-training" in rows["ServiceAccount"]
        )
        assert all(v.startswith("FAIL") for k, v in rows.items() if k.startswith("S3 "))

        api.delete(f"/api/v1/nodes/{bare}")
        add_node(cluster, full, NEURON)
        api.patch(
            f"/api/v1/namespaces/{namespace}",
            {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "privileged"}}},
        )
        api.create(
            f"/apis/apps/v1/namespaces/{namespace}/deployments", training_operator(namespace, full)
        )
        wait_for(
            lambda: (
                api.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/training-operator")
                .get("status", {})
                .get("readyReplicas")
            ),
            timeout=60,
            what="the training-operator Deployment ready",
        )
        api.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts",
            {
                "metadata": {
                    "name": "cpt-training",
                    "annotations": {
                        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/cpt"
                    },
                }
            },
        )
        code, rows = doctor(write_run(tmp_path, namespace, bucket), capsys)
        assert code == 0, rows
        assert all(v.startswith("ok") for v in rows.values()), rows
        assert "1 free trn1n.32xlarge nodes" in rows["free capacity"]
        # the probe object is gone again
        assert not s3_env.client().list_objects_v2(Bucket=bucket).get("Contents")
    finally:
        for name in (bare, full):
            api.delete(f"/api/v1/nodes/{name}")
