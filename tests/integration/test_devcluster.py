"""The local control plane behaves like the parts of EKS that cpt relies on."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.cluster import Cluster, devcluster, wait_for
from fixtures.s3 import S3Server

pytestmark = pytest.mark.integration

CHARTS = Path(__file__).resolve().parents[1] / "fixtures" / "charts"
NEURON_TOLERATION = {"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _get(cluster: Cluster, path: str) -> dict[str, Any]:
    obj: dict[str, Any] = cluster.api.get(path)
    return obj


def _pod(name: str, **spec: Any) -> dict[str, Any]:
    annotations = spec.pop("annotations", {})
    container = {"name": "main", "image": "registry.example/app:1"}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [container], **spec},
    }


def _wait_pod(
    cluster: Cluster, namespace: str, name: str, phase: str, timeout: float = 30
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        pod = _get(cluster, f"/api/v1/namespaces/{namespace}/pods/{name}")
        return pod if pod["status"].get("phase") == phase else None

    result: dict[str, Any] = wait_for(reached, timeout=timeout, what=f"pod {name} {phase}")
    return result


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond["type"] == kind:
            return dict(cond)
    return None


def test_the_api_server_reports_the_pinned_kubernetes_version(cluster: Cluster) -> None:
    version = _get(cluster, "/version")
    assert version["gitVersion"] == "v1.34.4"
    assert (version["major"], version["minor"]) == ("1", "34")
    out = json.loads(cluster.kubectl("version", "--output=json").stdout)
    assert out["serverVersion"]["gitVersion"] == "v1.34.4"


def test_status_reports_every_component_running_and_every_node_ready(cluster: Cluster) -> None:
    status = devcluster.status(cluster.state_dir)
    assert status["healthy"] is True
    assert all(status["components"].values()), status["components"]
    assert set(status["nodes"]) >= {
        "trn1-0", "trn1-1", "trn1-2", "trn1-3", "cpu-0", "cpu-1", "p5-0", "exec-0", "exec-1",
    }  # fmt: skip
    for name in ("etcd", "kube-apiserver", "kwok", "training-operator"):
        assert (cluster.logs_dir / f"{name}.log").stat().st_size > 0


def test_a_minted_service_account_token_authenticates_and_rbac_limits_it(
    cluster: Cluster, namespace: str
) -> None:
    rbac = f"""
apiVersion: v1
kind: ServiceAccount
metadata: {{name: reader, namespace: {namespace}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: read-configmaps, namespace: {namespace}}}
rules: [{{apiGroups: [""], resources: [configmaps], verbs: [get, list]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: reader, namespace: {namespace}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: read-configmaps}}
subjects: [{{kind: ServiceAccount, name: reader, namespace: {namespace}}}]
"""
    cluster.kubectl("apply", "-f", "-", input=rbac)
    token = cluster.kubectl("create", "token", "reader", "-n", namespace).stdout.strip()
    as_reader = devcluster.Api(cluster.api_url, token, cluster.ca_file)
    who = as_reader.request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:reader"
    assert as_reader.get(f"/api/v1/namespaces/{namespace}/configmaps")["kind"] == "ConfigMapList"
    with pytest.raises(devcluster.ApiError) as denied:
        as_reader.get(f"/api/v1/namespaces/{namespace}/secrets")
    assert denied.value.status == 403


def test_a_job_lands_on_a_cpu_node_and_succeeds(cluster: Cluster, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "tokenize"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"cpt.dev/pool": "cpu"},
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.example/app:1",
                            "resources": {"requests": {"cpu": "4", "memory": "8Gi"}},
                        }
                    ],
                }
            },
        },
    }
    cluster.api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", job, exist_ok=False)
    jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs/tokenize"
    wait_for(
        lambda: (_condition(_get(cluster, jobs), "Complete") or {}).get("status") == "True",
        timeout=30,
        what="Job tokenize Complete",
    )
    pods = _get(cluster, f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name%3Dtokenize")
    [pod] = pods["items"]
    assert pod["spec"]["nodeName"] in {"cpu-0", "cpu-1"}
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0


def test_neuron_devices_are_scheduled_as_extended_resources(
    cluster: Cluster, namespace: str
) -> None:
    def neuron_pod(name: str, devices: int) -> dict[str, Any]:
        res = {"aws.amazon.com/neuron": str(devices), "vpc.amazonaws.com/efa": "8"}
        return _pod(
            name,
            tolerations=[NEURON_TOLERATION],
            container={"resources": {"requests": res, "limits": res}},
        )

    pods = f"/api/v1/namespaces/{namespace}/pods"
    cluster.api.create(pods, neuron_pod("fits", 16), exist_ok=False)
    cluster.api.create(pods, neuron_pod("too-big", 17), exist_ok=False)
    fits = _wait_pod(cluster, namespace, "fits", "Running")
    assert fits["spec"]["nodeName"].startswith("trn1-")

    def unschedulable() -> dict[str, Any] | None:
        cond = _condition(_get(cluster, f"{pods}/too-big"), "PodScheduled")
        return cond if cond and cond.get("reason") == "Unschedulable" else None

    cond = wait_for(unschedulable, timeout=30, what="too-big to be Unschedulable")
    assert cond["status"] == "False"
    assert "Insufficient aws.amazon.com/neuron" in cond["message"]
    assert _get(cluster, f"{pods}/too-big")["status"]["phase"] == "Pending"


def _pytorchjob(name: str, port: int, annotations: dict[str, dict[str, str]]) -> dict[str, Any]:
    def replica(kind: str) -> dict[str, Any]:
        container: dict[str, Any] = {"name": "pytorch", "image": "registry.example/trainer:1"}
        if kind == "Master":
            container["ports"] = [{"name": "pytorchjob-port", "containerPort": port}]
        return {
            "replicas": 1,
            "restartPolicy": "Never",
            "template": {
                "metadata": {"annotations": annotations[kind]},
                "spec": {"nodeSelector": {"cpt.dev/pool": "cpu"}, "containers": [container]},
            },
        }

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {"pytorchReplicaSpecs": {"Master": replica("Master"), "Worker": replica("Worker")}},
    }


def _wait_job_condition(cluster: Cluster, path: str, kind: str, timeout: float = 60) -> None:
    wait_for(
        lambda: (_condition(_get(cluster, path), kind) or {}).get("status") == "True",
        timeout=timeout,
        what=f"{path} {kind}",
    )


def test_a_pytorchjob_gets_pods_a_service_and_rendezvous_env_and_succeeds(
    cluster: Cluster, namespace: str
) -> None:
    later = {"test.cpt.dev/outcome": "succeed", "test.cpt.dev/delay": "3s"}
    job = _pytorchjob("train", 23456, {"Master": later, "Worker": later})
    base = f"/apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs"
    cluster.api.create(base, job, exist_ok=False)
    pods = f"/api/v1/namespaces/{namespace}/pods"
    for pod_name in ("train-master-0", "train-worker-0"):
        wait_for(
            lambda n=pod_name: cluster.api.get_or_none(f"{pods}/{n}"),  # type: ignore[misc]
            timeout=30,
            what=f"pod {pod_name}",
        )
    env = {}
    for rank, pod_name in enumerate(("train-master-0", "train-worker-0")):
        spec = _get(cluster, f"{pods}/{pod_name}")["spec"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["MASTER_ADDR"] == "train-master-0"
        assert env["MASTER_PORT"] == "23456"
        assert env["WORLD_SIZE"] == "2"
        assert env["RANK"] == str(rank)
    svc = _get(cluster, f"/api/v1/namespaces/{namespace}/services/train-master-0")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"][0]["port"] == 23456
    _wait_job_condition(cluster, f"{base}/train", "Succeeded")


def test_a_pytorchjob_fails_when_a_pod_fails(cluster: Cluster, namespace: str) -> None:
    fail = {
        "test.cpt.dev/outcome": "fail",
        "test.cpt.dev/exit-code": "2",
        "test.cpt.dev/delay": "1s",
    }
    job = _pytorchjob("crash", 23457, {"Master": {}, "Worker": fail})
    base = f"/apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs"
    cluster.api.create(base, job, exist_ok=False)
    _wait_job_condition(cluster, f"{base}/crash", "Failed")
    worker = _get(cluster, f"/api/v1/namespaces/{namespace}/pods/crash-worker-0")
    assert worker["status"]["phase"] == "Failed"
    assert worker["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 2


def test_a_held_job_pod_keeps_running_until_given_an_outcome(
    cluster: Cluster, namespace: str
) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "held"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": {"test.cpt.dev/hold": "true"}},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"cpt.dev/pool": "cpu"},
                    "containers": [{"name": "main", "image": "registry.example/app:1"}],
                },
            },
        },
    }
    cluster.api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", job, exist_ok=False)
    pods = _get(cluster, f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name%3Dheld")
    name = (
        pods["items"][0]["metadata"]["name"]
        if pods["items"]
        else wait_for(
            lambda: _get(
                cluster, f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name%3Dheld"
            )["items"][0]["metadata"]["name"],
            timeout=30,
            what="the held Job's pod",
        )
    )
    _wait_pod(cluster, namespace, name, "Running")
    time.sleep(2.5)  # longer than the 1 s auto-complete delay of unheld Job pods
    assert _get(cluster, f"/api/v1/namespaces/{namespace}/pods/{name}")["status"]["phase"] == (
        "Running"
    )
    cluster.api.patch(
        f"/api/v1/namespaces/{namespace}/pods/{name}",
        {"metadata": {"annotations": {"test.cpt.dev/outcome": "succeed"}}},
    )
    _wait_job_condition(cluster, f"/apis/batch/v1/namespaces/{namespace}/jobs/held", "Complete")


def test_deleting_an_owner_garbage_collects_its_children(cluster: Cluster, namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    owner = cluster.api.create(base, {"metadata": {"name": "owner"}}, exist_ok=False)
    ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }
    cluster.api.create(
        base, {"metadata": {"name": "child", "ownerReferences": [ref]}}, exist_ok=False
    )
    cluster.api.delete(f"{base}/owner", propagationPolicy="Background")
    wait_for(
        lambda: cluster.api.get_or_none(f"{base}/child") is None,
        timeout=30,
        what="the garbage collector to delete the child",
    )


def test_helm_installs_a_chart_against_the_stamped_server_version(
    cluster: Cluster, namespace: str
) -> None:
    cluster.helm(
        "install", "demo", str(CHARTS / "hello"), "--namespace", namespace,
        "--set", "greeting=hi", "--wait", "--timeout", "60s",
    )  # fmt: skip
    cm = _get(cluster, f"/api/v1/namespaces/{namespace}/configmaps/demo-hello")
    assert cm["data"] == {"greeting": "hi", "kubeVersion": "v1.34.4"}
    deploy = _get(cluster, f"/apis/apps/v1/namespaces/{namespace}/deployments/demo-hello")
    assert deploy["status"]["readyReplicas"] == 1
    listed = json.loads(cluster.helm("list", "--namespace", namespace, "--output", "json").stdout)
    assert [(r["name"], r["status"]) for r in listed] == [("demo", "deployed")]


def test_a_node_can_be_made_not_ready_which_evicts_its_pods_and_ready_again(
    cluster: Cluster, namespace: str
) -> None:
    pods = f"/api/v1/namespaces/{namespace}/pods"
    short_lived = [
        GPU_TOLERATION,
        {
            "key": "node.kubernetes.io/not-ready",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 1,
        },
    ]
    on_p5 = {"kubernetes.io/hostname": "p5-0"}
    cluster.api.create(
        pods, _pod("victim", nodeSelector=on_p5, tolerations=short_lived), exist_ok=False
    )
    _wait_pod(cluster, namespace, "victim", "Running")
    try:
        cluster.set_node_ready("p5-0", False)
        assert not cluster.node_ready("p5-0")
        wait_for(
            lambda: cluster.api.get_or_none(f"{pods}/victim") is None,
            timeout=30,
            what="the pod on the NotReady node to be evicted",
        )
        cluster.api.create(
            pods, _pod("waiter", nodeSelector=on_p5, tolerations=[GPU_TOLERATION]), exist_ok=False
        )
        time.sleep(1)
        assert _get(cluster, f"{pods}/waiter")["status"]["phase"] == "Pending"
    finally:
        cluster.set_node_ready("p5-0", True)
    assert cluster.node_ready("p5-0")
    assert _wait_pod(cluster, namespace, "waiter", "Running")["spec"]["nodeName"] == "p5-0"


def test_s3_multipart_upload_and_download_round_trip(s3: S3Server, bucket: str) -> None:
    from boto3.s3.transfer import TransferConfig

    payload = os.urandom(12 * 1024 * 1024)
    config = TransferConfig(
        multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024
    )
    client = s3.client()
    client.upload_fileobj(io.BytesIO(payload), bucket, "blob.bin", Config=config)
    head = client.head_object(Bucket=bucket, Key="blob.bin")
    assert head["ContentLength"] == len(payload)
    assert head["ETag"].strip('"').endswith("-3"), "12 MiB in 5 MiB parts is a 3-part upload"
    out = io.BytesIO()
    client.download_fileobj(bucket, "blob.bin", out, Config=config)
    assert hashlib.sha256(out.getvalue()).hexdigest() == hashlib.sha256(payload).hexdigest()
