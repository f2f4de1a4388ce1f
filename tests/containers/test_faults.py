"""Faults only a real runtime produces, on the real node (docs/RELIABILITY.md, rows C1-C3).

* C1: the training container killed by its cgroup's memory limit (the kernel's OOM killer,
  exit 137, `OOMKilled`): attempt 2 resumes from the last committed checkpoint.
* C2: the operator's pod deleted mid-training: the Deployment's new pod (a new container of
  the same image, the same ServiceAccount token) carries on; no child is created twice.
* C3: the kubelet stopped mid-training: the node goes NotReady; after `nodeNotReadySeconds`
  attempt 1 ends `NodeNotReady`; with the kubelet back, attempt 2 resumes from the last commit.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from containers.harness import (
    RUN,
    OperatorRelease,
    container_statuses,
    describe,
    tiny_run,
)
from e2e.harness import Runs, committed_steps, prepare_real_inputs

from fixtures.cluster import Cluster, wait_for
from fixtures.node import RealNode
from fixtures.s3 import S3Server

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

LONG = 200  # steps: a fault must land between two commits, well before the end (40 finished
# within the 2-3 s the memory-limit test takes to inject its fault on a quiet host)


def start_long_run(
    runs: Runs, node: RealNode, bucket: str, s3: S3Server, **resiliency: Any
) -> None:
    prepare_real_inputs(s3, bucket)
    body = tiny_run(node.selector, node.tolerations, bucket, node.reachable(s3), maxSteps=LONG)
    body["spec"]["resiliency"].update(resiliency)
    runs.create(body)


def wait_first_commit(runs: Runs, cluster: Cluster, s3: S3Server, bucket: str) -> int:
    try:
        wait_for(
            lambda: committed_steps(s3, bucket, f"runs/{RUN}/"),
            timeout=900,
            what="a committed checkpoint",
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{describe(cluster, runs.ns)}") from None
    step = committed_steps(s3, bucket, f"runs/{RUN}/")[-1]
    assert step < LONG, "training finished before the fault could be injected"
    return step


def finish(runs: Runs, cluster: Cluster) -> dict[str, Any]:
    try:
        return runs.wait_phase(RUN, "Succeeded", timeout=1200)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{describe(cluster, runs.ns)}") from None


def master_pod(runs: Runs, attempt: int) -> dict[str, Any]:
    pods = runs.pods(f"cpt.dev/run={RUN},cpt.dev/attempt={attempt}")
    return next(p for p in pods if "-master-" in p["metadata"]["name"])


def _container_pids(node: RealNode, pod: dict[str, Any]) -> list[int]:
    """The host PIDs of the pod's training container (its cgroup's tasks, memory hierarchy)."""
    (status,) = container_statuses(pod)
    cid = status["containerID"].split("://", 1)[1]
    root = Path("/sys/fs/cgroup/memory/cpt-node")
    procs = [p for p in root.rglob("cgroup.procs") if p.parent.name == cid]
    assert procs, f"no memory cgroup for container {cid}"
    return [int(x) for x in procs[0].read_text().split()]


def test_a_training_container_killed_by_its_memory_limit_resumes_from_the_last_commit(
    real_node: RealNode,
    operator_release: OperatorRelease,
    runs: Runs,
    cluster: Cluster,
    bucket: str,
    s3: S3Server,
) -> None:
    # Attempt 1's pods get a 3 GiB memory limit from a LimitRange (applied at admission; it is
    # removed once they exist, so attempt 2 runs without one). Requests equal to limits for
    # CPU and memory make them Guaranteed: their processes' oom_score_adj is the lowest the
    # runtime may set, so the one raised below is the kernel's first choice.
    limits = {"memory": "3Gi", "cpu": "1"}
    cluster.api.create(
        f"/api/v1/namespaces/{runs.ns}/limitranges",
        {
            "metadata": {"name": "attempt-1"},
            "spec": {
                "limits": [{"type": "Container", "default": limits, "defaultRequest": limits}]
            },
        },
    )
    start_long_run(runs, real_node, bucket, s3)
    wait_for(lambda: runs.pods(f"cpt.dev/run={RUN},cpt.dev/attempt=1"), timeout=900,
             what="attempt 1's pod")  # fmt: skip
    cluster.api.delete(f"/api/v1/namespaces/{runs.ns}/limitranges/attempt-1")
    pod = master_pod(runs, 1)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == "3Gi"
    assert pod["status"].get("qosClass") in (None, "Guaranteed"), pod["status"].get("qosClass")
    killed_after = wait_first_commit(runs, cluster, s3, bucket)

    # The kernel picks its victim by badness: torchrun (the container's PID 1) is made the
    # preferred one, then an allocation in the same cgroup pushes it over its limit.
    pod = master_pod(runs, 1)
    torchrun = [
        pid for pid in _container_pids(real_node, pod)
        if b"torchrun" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]  # fmt: skip
    assert torchrun, "no torchrun process in the training container"
    Path(f"/proc/{min(torchrun)}/oom_score_adj").write_text("1000")
    hog = "b = bytearray(4 << 30); import time; time.sleep(60)"
    with contextlib.suppress(subprocess.TimeoutExpired):
        cluster.kubectl("exec", "-n", runs.ns, pod["metadata"]["name"], "--", "python", "-c",
                        hog, check=False, timeout=120)  # fmt: skip

    def oom_killed() -> dict[str, Any] | None:
        pods = runs.pods(f"cpt.dev/run={RUN},cpt.dev/attempt=1")
        for p in pods:
            for st in container_statuses(p):
                term = st["state"].get("terminated") or st.get("lastState", {}).get("terminated")
                if term:
                    return dict(term)
        return None

    term = wait_for(oom_killed, timeout=120, what="attempt 1's container terminated")
    assert term["exitCode"] == 137 and term["reason"] == "OOMKilled", term
    status = runs.wait(
        RUN, lambda s: s.get("attempt") == 2 and s.get("children", {}).get("train"),
        timeout=300, what="attempt 2 started",
    )  # fmt: skip
    assert status["resumeFrom"]["step"] >= killed_after
    assert "137" in status["attempts"][0].get("message", ""), status["attempts"][0]
    status = finish(runs, cluster)
    assert status["checkpoint"]["step"] == LONG
    assert "limits" not in (master_pod(runs, 2)["spec"]["containers"][0].get("resources") or {})


def test_the_operator_pod_deleted_mid_training_is_replaced_and_creates_no_duplicate_child(
    real_node: RealNode,
    operator_release: OperatorRelease,
    runs: Runs,
    cluster: Cluster,
    bucket: str,
    s3: S3Server,
) -> None:
    start_long_run(runs, real_node, bucket, s3)
    wait_first_commit(runs, cluster, s3, bucket)
    old = operator_release.running_pod()["metadata"]
    job_uid = cluster.api.get(
        f"/apis/kubeflow.org/v1/namespaces/{runs.ns}/pytorchjobs/{RUN}-train-1"
    )["metadata"]["uid"]
    cluster.kubectl("delete", "pod", "-n", runs.ns, old["name"], "--wait=false")
    new = wait_for(
        lambda: (p := operator_release.running_pod()) and p["metadata"]["uid"] != old["uid"] and p,
        timeout=180,
        what="the Deployment's new operator pod",
    )
    assert new["spec"]["nodeName"] == real_node.name
    status = finish(runs, cluster)
    assert status["attempt"] == 1 and len(status["attempts"]) == 1
    jobs = cluster.api.get(f"/apis/kubeflow.org/v1/namespaces/{runs.ns}/pytorchjobs")["items"]
    assert [j["metadata"]["uid"] for j in jobs if "-train-" in j["metadata"]["name"]] in (
        [job_uid],
        [],
    )
    batch = cluster.api.get(f"/apis/batch/v1/namespaces/{runs.ns}/jobs")["items"]
    names = [j["metadata"]["name"] for j in batch]
    assert len(names) == len(set(names))
    assert "AttemptFailed" not in runs.event_reasons(RUN)
    new_log = operator_release.logs(new["metadata"]["name"])
    assert "Traceback" not in new_log, new_log[-3000:]


def test_the_kubelet_stopped_mid_training_makes_the_node_not_ready_and_attempt_2_resumes(
    real_node: RealNode,
    operator_release: OperatorRelease,
    runs: Runs,
    cluster: Cluster,
    bucket: str,
    s3: S3Server,
) -> None:
    # One real node: the run may not exclude it, or attempt 2 could never be placed.
    start_long_run(runs, real_node, bucket, s3, nodeNotReadySeconds=5, excludeFailedNodes=False)
    stopped_after = wait_first_commit(runs, cluster, s3, bucket)
    real_node.stop_kubelet()
    try:
        wait_for(lambda: not real_node.ready(), timeout=120, what=f"node {real_node.name} NotReady")
        status = runs.wait(
            RUN,
            lambda s: len(s.get("attempts") or []) >= 1 and s["attempts"][0].get("reason"),
            timeout=180,
            what="attempt 1 ended",
        )
        assert status["attempts"][0]["reason"] == "NodeNotReady", status["attempts"][0]
        assert real_node.name in status["attempts"][0].get("message", "")
    finally:
        real_node.start_kubelet()
    wait_for(real_node.ready, timeout=120, what=f"node {real_node.name} Ready again")
    status = finish(runs, cluster)
    assert status["attempt"] == 2 and status["resumeFrom"]["step"] >= stopped_after
    assert status["checkpoint"]["step"] == LONG
