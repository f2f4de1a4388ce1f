"""Kueue for real (docs/RELIABILITY.md row 12): Kueue's controller manager, built from the
pinned module, runs against the fault cluster with its PyTorchJob integration
(tests/fixtures/kueue.py). A ClusterQueue whose trn1 quota fits one run: a second run waits
`Queued` with Kueue's reason (never `PendingTimeout`, though it waits past
`pendingTimeoutSeconds`) and starts when the first finishes; a higher-priority run preempts it
(Kueue suspends its job: the pods are deleted, as a SIGTERM to the trainer), and it later
resumes in the same attempt from its checkpoint, spending no retry budget. KWOK plays the trn1
nodes; `FakeTrainer` writes what the trainer would."""

from __future__ import annotations

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
    api.create(
        f"{KQ}/resourceflavors",
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": "trn1"},
            "spec": {"nodeLabels": {"node.kubernetes.io/instance-type": "trn1.32xlarge"}},
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
                    }
                ],
            },
        },
        exist_ok=True,
    )
    api.create(
        f"{KQ}/namespaces/{namespace}/localqueues",
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": QUEUE},
            "spec": {"clusterQueue": "trn1"},
        },
    )
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


def _spec(name: str, bucket: str, priority: str) -> dict[str, Any]:
    return fault_spec(
        name,
        bucket,
        runtime__kueueQueueName=QUEUE,
        runtime__priorityClassName=priority,
        resiliency={"pendingTimeoutSeconds": 5, "maxAttempts": 1},
        training__maxSteps=MAX_STEPS,
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
