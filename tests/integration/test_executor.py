"""The test-side executor runs pods on exec-* nodes as real local processes."""

from __future__ import annotations

import os
import re
import socket
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.cluster import Cluster, wait_for
from fixtures.executor import Executor, Rewriter, expand

pytestmark = pytest.mark.integration

ON_EXECUTOR: dict[str, Any] = {
    "nodeSelector": {"cpt.dev/local-executor": "true"},
    "tolerations": [
        {"key": "cpt.dev/local-executor", "operator": "Exists", "effect": "NoSchedule"}
    ],
}


def _job(name: str, code: str, **pod_spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "cpt-trainer:dev", "command": ["python", "-c", code]}
    container.update(pod_spec.pop("container", {}))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    **ON_EXECUTOR,
                    "restartPolicy": "Never",
                    "containers": [container],
                    **pod_spec,
                }
            },
        },
    }


def _create(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    group = "api/v1" if obj["apiVersion"] == "v1" else f"apis/{obj['apiVersion']}"
    plural = {"Job": "jobs", "PyTorchJob": "pytorchjobs", "ConfigMap": "configmaps", "Pod": "pods"}
    cluster.api.create(
        f"/{group}/namespaces/{namespace}/{plural[obj['kind']]}", obj, exist_ok=False
    )


def _job_pod(cluster: Cluster, namespace: str, job: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        pods = cluster.api.get(
            f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name%3D{job}"
        )["items"]
        return pods[0] if pods else None

    pod: dict[str, Any] = wait_for(found, timeout=30, what=f"a pod of Job {job}")
    return pod


def _wait_phase(
    cluster: Cluster, namespace: str, pod: str, phases: set[str], timeout: float = 60
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj: dict[str, Any] = cluster.api.get(f"/api/v1/namespaces/{namespace}/pods/{pod}")
        return obj if obj["status"].get("phase") in phases else None

    result: dict[str, Any] = wait_for(reached, timeout=timeout, what=f"pod {pod} in {phases}")
    return result


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return state


def test_a_job_pod_on_an_executor_node_runs_for_real_and_succeeds(
    cluster: Cluster, namespace: str, executor: Executor
) -> None:
    code = textwrap.dedent(
        """
        import os, pathlib
        out = pathlib.Path(os.environ["OUT_DIR"]) / "result.txt"
        out.write_text(" ".join(os.environ[k] for k in ("POD_NAME", "GREETING", "TOKEN")))
        print("wrote", out, flush=True)
        """
    )
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "creds"},
        "stringData": {"token": "s3cr3t"},
    }
    cluster.api.create(f"/api/v1/namespaces/{namespace}/secrets", secret, exist_ok=False)
    job = _job(
        "writer",
        code,
        container={
            "env": [
                {"name": "OUT_DIR", "value": "/out"},
                {"name": "GREETING", "value": "hello:$(OUT_DIR)"},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {
                    "name": "TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}},
                },
            ],
            "volumeMounts": [{"name": "out", "mountPath": "/out"}],
        },
        volumes=[{"name": "out", "emptyDir": {}}],
    )
    _create(cluster, namespace, job)
    pod = _job_pod(cluster, namespace, "writer")
    name = pod["metadata"]["name"]
    done = _wait_phase(cluster, namespace, name, {"Succeeded", "Failed"})
    logs = executor.logs(namespace, name)
    assert done["status"]["phase"] == "Succeeded", logs
    assert done["spec"]["nodeName"].startswith("exec-")
    assert done["status"]["podIP"] == "127.0.0.1", "KWOK must leave executor pods alone"
    assert _terminated(done)["exitCode"] == 0
    assert _terminated(done)["reason"] == "Completed"
    m = re.search(r"^wrote (\S+)$", logs, re.M)
    assert m, logs
    written = Path(m.group(1))
    assert not str(written).startswith("/out/"), "the mountPath must map to a per-pod dir"
    host_out = str(written.parent)
    assert written.read_text() == f"{name} hello:{host_out} s3cr3t"
    assert "s3cr3t" not in logs
    wait_for(
        lambda: cluster.api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/writer")["status"].get(
            "succeeded"
        ),
        timeout=30,
        what="Job writer succeeded",
    )


def test_a_failing_container_fails_the_pod_with_its_exit_code(
    cluster: Cluster, namespace: str, executor: Executor
) -> None:
    _create(cluster, namespace, _job("exits", "import sys; print('bye'); sys.exit(3)"))
    pod = _job_pod(cluster, namespace, "exits")
    done = _wait_phase(cluster, namespace, pod["metadata"]["name"], {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Failed"
    assert _terminated(done)["exitCode"] == 3
    assert _terminated(done)["reason"] == "Error"
    assert "bye" in executor.logs(namespace, pod["metadata"]["name"])


def test_a_container_failing_under_restart_policy_on_failure_is_restarted_in_place(
    cluster: Cluster, namespace: str, executor: Executor
) -> None:
    code = textwrap.dedent(
        """
        import pathlib, sys
        marker = pathlib.Path("/scratch/attempted")
        if not marker.exists():
            marker.write_text("1")
            print("first attempt fails", flush=True)
            sys.exit(5)
        print("second attempt succeeds", flush=True)
        """
    )
    job = _job(
        "flaky",
        code,
        restartPolicy="OnFailure",
        container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    job["spec"]["backoffLimit"] = 2  # with OnFailure the Job controller counts restarts
    _create(cluster, namespace, job)
    name = _job_pod(cluster, namespace, "flaky")["metadata"]["name"]
    done = _wait_phase(cluster, namespace, name, {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded", executor.logs(namespace, name)
    status = done["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 5
    logs = executor.logs(namespace, name)
    assert logs.index("first attempt fails") < logs.index("second attempt succeeds")


def test_killing_a_pods_process_fails_the_pod(
    cluster: Cluster, namespace: str, executor: Executor
) -> None:
    code = "import time; print('up', flush=True); time.sleep(300)"
    _create(cluster, namespace, _job("sleeper", code))
    name = _job_pod(cluster, namespace, "sleeper")["metadata"]["name"]
    executor.wait_running(namespace, name)
    _wait_phase(cluster, namespace, name, {"Running"})
    assert executor.kill(namespace, name) == 1
    done = _wait_phase(cluster, namespace, name, {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Failed"
    assert _terminated(done)["exitCode"] == 137


def test_deleting_a_pod_stops_its_processes(
    cluster: Cluster, namespace: str, executor: Executor
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "daemon"},
        "spec": {
            **ON_EXECUTOR,
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "main",
                    "image": "x",
                    "command": ["python", "-c"],
                    "args": [
                        "import os, time; print('pid', os.getpid(), flush=True); time.sleep(300)"
                    ],
                }
            ],
        },
    }
    _create(cluster, namespace, pod)
    executor.wait_running(namespace, "daemon")
    m = wait_for(
        lambda: re.search(r"^pid (\d+)$", executor.logs(namespace, "daemon"), re.M),
        timeout=30,
        what="the container to print its pid",
    )
    pid = int(m.group(1))
    os.kill(pid, 0)  # it runs
    cluster.api.delete(f"/api/v1/namespaces/{namespace}/pods/daemon")
    wait_for(
        lambda: cluster.api.get_or_none(f"/api/v1/namespaces/{namespace}/pods/daemon") is None,
        timeout=30,
        what="pod daemon to be gone",
    )

    def stopped() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(stopped, timeout=15, what=f"process {pid} to stop")


ALL_REDUCE = """
import os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
out = os.path.join(os.environ["OUT_DIR"], f"rank{rank}.txt")
with open(out, "w") as fh:
    fh.write(str(t.item()))
print(f"allreduce ok rank={rank} world={world} sum={t.item()} out={out}", flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_two_node_pytorchjob_runs_a_real_gloo_all_reduce_with_torchrun(
    cluster: Cluster, namespace: str, executor: Executor
) -> None:
    port = _free_port()
    _create(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "scripts"},
            "data": {"allreduce.py": ALL_REDUCE},
        },
    )

    def replica(node: str) -> dict[str, Any]:
        container = {
            "name": "pytorch",
            "image": "cpt-trainer:dev",
            "command": [
                "torchrun",
                "--nnodes=$(PET_NNODES)",
                "--nproc-per-node=1",
                "--node-rank=$(PET_NODE_RANK)",
                "--master-addr=$(MASTER_ADDR)",
                "--master-port=$(MASTER_PORT)",
                "/scripts/allreduce.py",
            ],
            "env": [{"name": "OUT_DIR", "value": "/out"}],
            "ports": [{"name": "pytorchjob-port", "containerPort": port}],
            "volumeMounts": [
                {"name": "scripts", "mountPath": "/scripts"},
                {"name": "out", "mountPath": "/out"},
            ],
        }
        return {
            "replicas": 1,
            "restartPolicy": "Never",
            "template": {
                "spec": {
                    **ON_EXECUTOR,
                    "nodeSelector": {
                        "cpt.dev/local-executor": "true",
                        "kubernetes.io/hostname": node,
                    },
                    "containers": [container],
                    "volumes": [
                        {"name": "scripts", "configMap": {"name": "scripts"}},
                        {"name": "out", "emptyDir": {}},
                    ],
                }
            },
        }

    _create(
        cluster,
        namespace,
        {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": {"name": "allreduce"},
            "spec": {
                "pytorchReplicaSpecs": {"Master": replica("exec-0"), "Worker": replica("exec-1")}
            },
        },
    )
    path = f"/apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs/allreduce"

    def finished() -> str | None:
        conds = cluster.api.get(path).get("status", {}).get("conditions") or []
        for c in conds:
            if c["type"] in ("Succeeded", "Failed") and c["status"] == "True":
                return str(c["type"])
        return None

    t0 = time.monotonic()
    outcome = wait_for(finished, timeout=240, what="PyTorchJob allreduce to finish")
    logs = {p: executor.logs(namespace, p) for p in ("allreduce-master-0", "allreduce-worker-0")}
    assert outcome == "Succeeded", logs
    outs = []
    for rank, pod in enumerate(("allreduce-master-0", "allreduce-worker-0")):
        m = re.search(rf"allreduce ok rank={rank} world=2 sum=3.0 out=(\S+)", logs[pod])
        assert m, logs[pod]
        outs.append(Path(m.group(1)))
        assert outs[-1].read_text() == "3.0"
    assert outs[0].parent != outs[1].parent, "each pod gets its own emptyDir"
    nodes = {
        cluster.api.get(f"/api/v1/namespaces/{namespace}/pods/{p}")["spec"]["nodeName"]
        for p in logs
    }
    assert nodes == {"exec-0", "exec-1"}
    print(f"torchrun all_reduce job finished in {time.monotonic() - t0:.1f}s")


def test_the_rewriter_maps_service_names_and_mount_paths_only_where_they_stand_alone(
    tmp_path: Path,
) -> None:
    rw = Rewriter(
        namespace="ns",
        services={"job-master-0"},
        owner="job",
        mounts={"/data": tmp_path / "d", "/data/sub": tmp_path / "s"},
    )
    assert rw("job-master-0") == "127.0.0.1"
    assert rw("--master-addr=job-master-0") == "--master-addr=127.0.0.1"
    assert rw("tcp://job-worker-3:29500") == "tcp://127.0.0.1:29500"
    assert rw("job-master-0.ns.svc.cluster.local:80") == "127.0.0.1:80"
    assert rw("other.team.svc") == "127.0.0.1"
    assert rw("s3://bucket/job-master-0/x") == "s3://bucket/job-master-0/x"
    assert rw("job-master-0x") == "job-master-0x"
    assert rw("/data/x") == f"{tmp_path}/d/x"
    assert rw("/data/sub/y") == f"{tmp_path}/s/y"
    assert rw("file:///data") == f"file://{tmp_path}/d"
    assert rw("/database") == "/database"
    assert rw("/x/data") == "/x/data"
    assert expand("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"
