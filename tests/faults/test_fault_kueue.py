"""Kueue for real (docs/RELIABILITY.md row 12): Kueue's controller manager, built from the
pinned module, runs against the fault cluster with its PyTorchJob integration
(tests/fixtures/kueue.py). A ClusterQueue whose trn1 quota fits one run: a second run waits
`Queued` with Kueue's reason (never `PendingTimeout`, though it waits past
`pendingTimeoutSeconds`) and starts when the first finishes; a higher-priority run preempts it
(Kueue suspends its job: the pods are deleted, as a SIGTERM to the trainer), and it later
resumes in the same attempt from its checkpoint, spending no retry budget. KWOK plays the trn1
nodes; `FakeTrainer` writes what the trainer would."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from e2e.harness import FakeTrainer, Runs
from faults._support import condition, fault_spec, stays

from fixtures import kueue
from fixtures.cluster import Cluster
from fixtures.s3 import S3Server

# The first run builds Kueue (about 10 minutes on 2 cores), then it is cached.
pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(2400)]

MAX_STEPS = 40
QUEUE = "trn1"
KQ = "/apis/kueue.x-k8s.io/v1beta2"


@pytest.fixture(scope="module")
def kueue_process(fault_cluster: Cluster) -> Iterator[Any]:
    yield from kueue.run_kueue(fault_cluster)


def _queues(cluster: Cluster, namespace: str) -> None:
    api = cluster.api
    # "cpu" is the tool Jobs' flavor (kueueQueueTools): CPU on the local m5 nodes. Kueue adds
    # its node labels to an admitted Job's pod template, which shows the admission on the Job.
    for flavor, instance_type in (("trn1", "trn1.32xlarge"), ("cpu", "m5.8xlarge")):
        api.create(
            f"{KQ}/resourceflavors",
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "ResourceFlavor",
                "metadata": {"name": flavor},
                "spec": {"nodeLabels": {"node.kubernetes.io/instance-type": instance_type}},
            },
            exist_ok=True,
        )
    api.create(
        f"{KQ}/clusterqueues",
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": "trn1"},
            "spec": {
                "namespaceSelector": {},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["aws.amazon.com/neuron", "vpc.amazonaws.com/efa"],
                        "flavors": [
                            {
                                "name": "trn1",
                                "resources": [
                                    {"name": "aws.amazon.com/neuron", "nominalQuota": 32},
                                    {"name": "vpc.amazonaws.com/efa", "nominalQuota": 16},
                                ],
                            }
                        ],
                    },
                    _cpu_group(cpu="8"),
                ],
            },
        },
        exist_ok=True,
    )
    _local_queue(cluster, namespace, QUEUE, "trn1")
    for name, value in (("cpt-low", 100), ("cpt-high", 1000)):
        api.create(
            "/apis/scheduling.k8s.io/v1/priorityclasses",
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": name},
                "value": value,
            },
            exist_ok=True,
        )


def _cpu_group(cpu: str) -> dict[str, Any]:
    """The ClusterQueue's resource group for the tool Jobs (a group of its own: the training
    pods request only Neuron devices and EFA, so they never get this flavor's node labels)."""
    return {
        "coveredResources": ["cpu", "memory"],
        "flavors": [
            {
                "name": "cpu",
                "resources": [
                    {"name": "cpu", "nominalQuota": cpu},
                    {"name": "memory", "nominalQuota": "64Gi"},
                ],
            }
        ],
    }


def _local_queue(cluster: Cluster, namespace: str, name: str, cluster_queue: str) -> None:
    cluster.api.create(
        f"{KQ}/namespaces/{namespace}/localqueues",
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": name},
            "spec": {"clusterQueue": cluster_queue},
        },
    )


def _spec(
    name: str, bucket: str, priority: str | None = None, *, queue: str = QUEUE, **changes: Any
) -> dict[str, Any]:
    if priority:
        changes["runtime__priorityClassName"] = priority
    return fault_spec(
        name,
        bucket,
        runtime__kueueQueueName=queue,
        resiliency={"pendingTimeoutSeconds": 5, "maxAttempts": 1},
        training__maxSteps=MAX_STEPS,
        **changes,
    )


def _finish(runs: Runs, run: str, trainer: FakeTrainer) -> None:
    trainer.commit(MAX_STEPS)
    trainer.progress(attempt=1, step=MAX_STEPS, max_steps=MAX_STEPS, committed=MAX_STEPS)
    pods = runs.training_pods(run, 1, count=2, timeout=90)
    master = next(p for p in pods if "-master-" in p["metadata"]["name"])
    runs.finish_pod(master["metadata"]["name"])
    runs.wait_phase(run, "Succeeded", timeout=90)


def _queued(runs: Runs, run: str, reason: str, timeout: float = 60) -> dict[str, Any]:
    return runs.wait(
        run,
        lambda s: any(
            c["type"] == "Queued" and c["status"] == "True" and c["reason"] == reason
            for c in s.get("conditions") or []
        ),
        timeout=timeout,
        what=f"{run} Queued/{reason}",
    )


def test_kueue_queues_the_second_run_and_a_higher_priority_run_preempts_it_without_a_retry(
    runs: Runs, fault_cluster: Cluster, kueue_process: Any, bucket: str, s3_env: S3Server
) -> None:
    _queues(fault_cluster, runs.ns)
    first, second = _spec("kfirst", bucket, "cpt-low"), _spec("ksecond", bucket, "cpt-low")
    runs.create(first)
    runs.training_pods("kfirst", 1, count=2, timeout=120)  # admitted: its pods run
    runs.create(second)
    status = _queued(runs, "ksecond", "Pending", timeout=120)
    queued = condition(status, "Queued")
    assert "insufficient" in queued["message"] or "quota" in queued["message"], queued
    # Well past pendingTimeoutSeconds (5 s) in the queue: still one attempt, nothing failed.
    stays(
        lambda: (
            not runs.pods("cpt.dev/run=ksecond,cpt.dev/stage=train")
            and condition(runs.status("ksecond"), "Queued")["status"] == "True"
        ),
        seconds=8,
        what="the queued run has no pods and stays Queued",
    )
    status = runs.status("ksecond")
    assert status["phase"] == "Training" and status["attempt"] == 1
    assert condition(status, "Queued")["status"] == "True"
    assert not status["attempts"][0].get("reason")

    _finish(runs, "kfirst", FakeTrainer(first["spec"]["checkpoints"]["s3Uri"]))
    runs.training_pods("ksecond", 1, count=2, timeout=120)  # admitted once the quota is free
    status = runs.wait(
        "ksecond",
        lambda s: condition(s, "Queued")["status"] == "False",
        timeout=60,
        what="ksecond admitted",
    )
    assert condition(status, "Queued")["reason"] == "Admitted"
    trainer = FakeTrainer(second["spec"]["checkpoints"]["s3Uri"])
    trainer.commit(10)
    trainer.progress(attempt=1, step=12, max_steps=MAX_STEPS, committed=10)

    urgent = _spec("kurgent", bucket, "cpt-high")
    runs.create(urgent)
    status = _queued(runs, "ksecond", "Preempted", timeout=120)
    assert "Preempted to accommodate" in condition(status, "Queued")["message"]
    runs.training_pods("kurgent", 1, count=2, timeout=120)
    status = runs.status("ksecond")
    assert status["attempt"] == 1 and status["phase"] == "Training"

    _finish(runs, "kurgent", FakeTrainer(urgent["spec"]["checkpoints"]["s3Uri"]))
    runs.training_pods("ksecond", 1, count=2, timeout=120)  # the same attempt, admitted again
    trainer.commit(20)
    _finish(runs, "ksecond", trainer)
    status = runs.status("ksecond")
    assert [a.get("reason") for a in status["attempts"]] == ["Completed"]
    assert status["attempts"][0]["queuedSeconds"] > 0
    reasons = runs.event_reasons("ksecond")
    assert "AttemptFailed" not in reasons and "Queued" in reasons


# -- tool Jobs (spec.runtime.kueueQueueTools) ------------------------------------------------


def _tools_spec(name: str, bucket: str, queue: str) -> dict[str, Any]:
    return _spec(
        name,
        bucket,
        queue=queue,
        runtime__kueueQueueTools=True,
        runtime__toolsResources={"cpu": "1", "memory": "1Gi"},
    )


def _admitted_by_kueue(runs: Runs, job_name: str, cluster_queue: str) -> None:
    """The Job's Workload holds Kueue's admission (the cpu flavor), and the Job was created
    suspended and started by Kueue: Kueue's `Started` event, its flavor's node label added to
    the pod template, and no `Stopped` event (it never ran unadmitted)."""
    job = runs.api.get(f"/apis/batch/v1/namespaces/{runs.ns}/jobs/{job_name}")
    uid = job["metadata"]["uid"]
    (wl,) = runs.api.get(
        f"{KQ}/namespaces/{runs.ns}/workloads?labelSelector=kueue.x-k8s.io/job-uid={uid}"
    )["items"]
    admission = (wl.get("status") or {}).get("admission") or {}
    assert admission.get("clusterQueue") == cluster_queue, wl.get("status")
    flavors = {r: f for ps in admission["podSetAssignments"] for r, f in ps["flavors"].items()}
    assert flavors == {"cpu": "cpu", "memory": "cpu"}
    assert job["spec"]["suspend"] is False
    selector = job["spec"]["template"]["spec"]["nodeSelector"]
    assert selector["node.kubernetes.io/instance-type"] == "m5.8xlarge", selector
    events = runs.api.get(
        f"/api/v1/namespaces/{runs.ns}/events"
        f"?fieldSelector=involvedObject.kind=Job,involvedObject.name={job_name}"
    )["items"]
    said = [(e["reason"], e["message"]) for e in events]
    assert any(r == "Started" and f"clusterQueue {cluster_queue}" in m for r, m in said), said
    assert "Stopped" not in [r for r, _ in said], said


def test_the_tool_jobs_of_a_run_with_kueue_queue_tools_are_admitted_by_kueue(
    runs: Runs, fault_cluster: Cluster, kueue_process: Any, bucket: str, s3_env: S3Server
) -> None:
    _queues(fault_cluster, runs.ns)
    body = _tools_spec("ktools", bucket, QUEUE)
    runs.create(body)
    runs.training_pods("ktools", 1, count=2, timeout=180)  # tokenize and weights went first
    _admitted_by_kueue(runs, "ktools-tokenize", "trn1")
    _admitted_by_kueue(runs, "ktools-weights", "trn1")
    _finish(runs, "ktools", FakeTrainer(body["spec"]["checkpoints"]["s3Uri"]))
    _admitted_by_kueue(runs, "ktools-export", "trn1")
    status = runs.status("ktools")
    assert condition(status, "Exported")["status"] == "True"
    # Queued=True shows only if the operator looks while Kueue still holds a Job: with free
    # quota Kueue admits within the operator's resync, so either way the queue never failed it.
    assert "PendingTimeout" not in json.dumps(status)


def test_a_tool_job_no_quota_can_fit_keeps_the_run_queued_with_kueues_reason_not_timed_out(
    runs: Runs, fault_cluster: Cluster, kueue_process: Any, bucket: str, s3_env: S3Server
) -> None:
    _queues(fault_cluster, runs.ns)
    api = fault_cluster.api
    tight = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": "tight"},
        "spec": {"namespaceSelector": {}, "resourceGroups": [_cpu_group(cpu="1")]},
    }
    api.create(f"{KQ}/clusterqueues", tight, exist_ok=True)
    try:
        _local_queue(fault_cluster, runs.ns, "tight", "tight")
        runs.create(_tools_spec("ktight", bucket, "tight"))  # 4 shards x 1 CPU > 1 CPU
        status = _queued(runs, "ktight", "Pending", timeout=120)
        queued = condition(status, "Queued")
        assert "ktight-tokenize" in queued["message"], queued
        assert "insufficient quota for cpu in flavor cpu" in queued["message"], queued
        # Well past pendingTimeoutSeconds (5 s): still Tokenizing and Queued, no pod.
        stays(
            lambda: (
                runs.status("ktight").get("phase") == "Tokenizing"
                and condition(runs.status("ktight"), "Queued")["status"] == "True"
                and not runs.pods("cpt.dev/run=ktight,cpt.dev/stage=tokenize")
            ),
            seconds=8,
            what="the run stays Tokenizing and Queued",
        )
        (job,) = runs.jobs("ktight")
        assert job["spec"]["suspend"] is True
        status = runs.status("ktight")
        assert condition(status, "DataReady")["reason"] == "InProgress"
        assert "PendingTimeout" not in json.dumps(status)
        assert "Queued" in runs.event_reasons("ktight")
    finally:
        api.delete(f"{KQ}/clusterqueues/tight")
