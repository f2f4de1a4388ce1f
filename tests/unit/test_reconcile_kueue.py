"""Decision tables of runs queued by Kueue: jobs created suspended with the queue label, the
condition Queued with Kueue's own reason from the Workload (training, preflight and, with
kueueQueueTools, the tool Jobs), preemption by Kueue without a retry, and queued time kept
out of the pending clock and the deadline."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from test_reconcile import (
    T0,
    body_of,
    condition,
    creates,
    deletes,
    events,
    gang,
    ptj,
    run,
    status_in,
    ts,
)
from test_reconcile_lifecycle import NODES, TRAIN_1, train_manifest, training

from cpt_operator.reconcile.actions import CreateChild

pytestmark = pytest.mark.unit


def suspended_ptj(name: str, attempt: int, uid: str = "uid-1") -> dict[str, Any]:
    obj = ptj(name, attempt, condition="Suspended")
    obj["metadata"]["uid"] = uid
    obj["spec"] = {"runPolicy": {"suspend": True}}
    return obj


def workload(uid: str, *conds: tuple[str, str, str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": f"pytorchjob-x-{uid}", "labels": {"kueue.x-k8s.io/job-uid": uid}},
        "status": {
            "conditions": [
                {"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conds
            ]
        },
    }


NO_QUOTA = (
    "QuotaReserved",
    "False",
    "Pending",
    "couldn't assign flavors to pod set master: insufficient unused quota for "
    "aws.amazon.com/neuron in flavor trn1, 32 more needed",
)


def test_the_training_job_is_created_suspended_for_kueue_with_its_queue_label() -> None:
    body = body_of("trn1-nxd", runtime__kueueQueueName="trn1")
    status = status_in("Training", body)
    d = run(body, {**status, "children": {}, "attempt": 1, "attempts": []})
    manifest = train_manifest(d)
    assert manifest["spec"]["runPolicy"]["suspend"] is True
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "trn1"
    plain = body_of("trn1-nxd", runtime__kueueQueueName=None)
    d = run(plain, {**training(plain), "children": {}, "attempts": []})
    assert "suspend" not in train_manifest(d)["spec"]["runPolicy"]


def test_a_job_kueue_has_not_admitted_is_queued_with_kueues_reason_past_the_pending_timeout() -> (
    None
):
    body = body_of(
        "trn1-nxd", runtime__kueueQueueName="trn1", resiliency={"pendingTimeoutSeconds": 60}
    )
    status = training(body)
    later = T0 + timedelta(hours=3)  # far past pendingTimeoutSeconds and hangTimeoutSeconds
    d = run(
        body,
        status,
        later,
        pytorchjobs=[suspended_ptj(TRAIN_1, 1)],
        workloads=[workload("uid-1", NO_QUOTA)],
    )
    assert d.status["phase"] == "Training" and d.status["attempt"] == 1
    queued = condition(d.status, "Queued")
    assert queued["status"] == "True" and queued["reason"] == "Pending"
    assert "insufficient unused quota" in queued["message"]
    assert "LocalQueue trn1" in d.status["message"]
    assert ("Normal", "Queued") in events(d) and deletes(d) == []
    again = run(
        body,
        d.status,
        later + timedelta(minutes=5),
        pytorchjobs=[suspended_ptj(TRAIN_1, 1)],
        workloads=[workload("uid-1", NO_QUOTA)],
    )
    assert again.actions == []  # said once; nothing times out while queued


def test_without_a_workload_the_queued_condition_says_what_to_check() -> None:
    body = body_of("trn1-nxd", runtime__kueueQueueName="trn1")
    d = run(body, training(body), pytorchjobs=[suspended_ptj(TRAIN_1, 1)])
    queued = condition(d.status, "Queued")
    assert queued["reason"] == "WaitingForKueue" and "kubeflow.org/pytorchjob" in queued["message"]


def test_a_kueue_preemption_suspends_the_attempt_and_admission_resumes_it_without_a_retry() -> None:
    body = body_of(
        "trn1-nxd", runtime__kueueQueueName="trn1", resiliency={"pendingTimeoutSeconds": 60}
    )
    status = training(body)
    evicted = (
        "Evicted",
        "True",
        "Preempted",
        "Preempted to accommodate a workload (UID: w2) due to prioritization in the ClusterQueue",
    )
    # Kueue suspended the running job: its pods are being deleted (SIGTERM: the trainer commits).
    d = run(
        body,
        status,
        T0,
        pytorchjobs=[suspended_ptj(TRAIN_1, 1)],
        pods=gang(1, deleting=True),
        nodes=NODES,
        workloads=[workload("uid-1", evicted)],
    )
    assert d.status["attempt"] == 1 and deletes(d) == [] and creates(d) == []
    assert condition(d.status, "Queued")["reason"] == "Preempted"
    assert d.status["attempts"][0].get("reason", "") == ""  # the attempt goes on
    # Admitted again an hour later: the same job runs; the pending clock starts now.
    back = T0 + timedelta(hours=1)
    running = ptj(TRAIN_1, 1)
    running["metadata"]["uid"] = "uid-1"
    a = run(body, d.status, back, pytorchjobs=[running], nodes=NODES)
    assert condition(a.status, "Queued")["status"] == "False"
    assert a.status["attempts"][0]["queuedSeconds"] == 3600
    assert deletes(a) == [] and a.status["attempt"] == 1
    # 30 s after admission with its pods not created yet: inside the 60 s pending timeout.
    b = run(body, a.status, back + timedelta(seconds=30), pytorchjobs=[running], nodes=NODES)
    assert deletes(b) == [] and b.status["attempt"] == 1


def test_time_queued_by_kueue_does_not_count_against_the_deadline() -> None:
    body = body_of(
        "trn1-nxd", runtime__kueueQueueName="trn1", resiliency={"activeDeadlineSeconds": 3600}
    )
    d = run(
        body,
        training(body),
        T0 + timedelta(seconds=60),
        pytorchjobs=[suspended_ptj(TRAIN_1, 1)],
        workloads=[workload("uid-1", NO_QUOTA)],
    )
    assert d.status["phase"] == "Training"
    # Queued since this reconcile: ten hours later the queued time is excluded.
    later = run(
        body,
        d.status,
        T0 + timedelta(hours=10),
        pytorchjobs=[suspended_ptj(TRAIN_1, 1)],
        workloads=[workload("uid-1", NO_QUOTA)],
    )
    assert later.status["phase"] == "Training" and deletes(later) == []


def test_time_a_tool_job_was_queued_by_kueue_still_does_not_count_after_its_admission() -> None:
    body = body_of(
        "trn1-nxd",
        runtime__kueueQueueName="trn1",
        runtime__kueueQueueTools=True,
        resiliency={"activeDeadlineSeconds": 3600, "preflight": {"enabled": False}},
    )
    meta = {"name": "llama-cpt-tokenize", "uid": "j1", "creationTimestamp": ts(T0)}
    held = {"metadata": meta, "spec": {"suspend": True}, "status": {}}
    queued = run(body, run(body, None).status, T0, jobs=[held], workloads=[workload("j1")])
    back = T0 + timedelta(hours=2)  # admitted after two hours in the queue
    admitted = {**held, "spec": {"suspend": False}, "status": {"active": 1}}
    a = run(body, queued.status, back, jobs=[admitted])
    assert a.status["queuedSeconds"] == 7200
    # Half an hour of tokenizing later: 2.5 h since the start, 30 min of it counted.
    b = run(body, a.status, back + timedelta(minutes=30), jobs=[admitted])
    assert b.status["phase"] == "Tokenizing" and deletes(b) == []
    assert b.status["queuedSeconds"] == 7200 and "deadlineExceededAt" not in b.status


def test_a_preflight_check_kueue_holds_is_queued_and_its_queue_time_is_not_counted() -> None:
    body = body_of(
        "trn1-nxd", runtime__kueueQueueName="trn1", resiliency={"activeDeadlineSeconds": 3600}
    )
    created = run(body, None)
    assert created.status["phase"] == "Preflight"
    held = suspended_ptj("llama-cpt-preflight", 0, uid="p1")
    q = run(body, created.status, T0, pytorchjobs=[held], workloads=[workload("p1", NO_QUOTA)])
    assert condition(q.status, "Queued")["reason"] == "Pending" and deletes(q) == []
    assert "PyTorchJob llama-cpt-preflight queued in LocalQueue trn1" in q.status["message"]
    admitted = {**held, "spec": {"runPolicy": {}}}
    a = run(body, q.status, T0 + timedelta(hours=2), pytorchjobs=[admitted])
    assert condition(a.status, "Queued")["reason"] == "Admitted"
    assert a.status["queuedSeconds"] == 7200 and a.status["phase"] == "Preflight"


def test_tool_jobs_are_queued_only_when_configured_and_wait_without_a_pending_timeout() -> None:
    body = body_of(
        "trn1-nxd",
        runtime__kueueQueueName="trn1",
        runtime__kueueQueueTools=True,
        resiliency={"pendingTimeoutSeconds": 60, "preflight": {"enabled": False}},
    )
    d = run(body, None)
    (action,) = [a for a in d.actions if isinstance(a, CreateChild)]
    assert action.manifest["spec"]["suspend"] is True
    assert action.manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "trn1"
    held = {
        "metadata": {"name": "llama-cpt-tokenize", "uid": "j1", "creationTimestamp": ts(T0)},
        "spec": {"suspend": True},
        "status": {},
    }
    later = T0 + timedelta(hours=1)
    queued = run(body, d.status, later, jobs=[held], workloads=[workload("j1", NO_QUOTA)])
    assert queued.status["phase"] == "Tokenizing" and deletes(queued) == []
    assert condition(queued.status, "Queued")["reason"] == "Pending"
    assert "Job llama-cpt-tokenize queued in LocalQueue trn1" in queued.status["message"]
    admitted = {**held, "spec": {"suspend": False}}
    a = run(body, queued.status, later + timedelta(seconds=30), jobs=[admitted])
    assert condition(a.status, "Queued")["status"] == "False" and deletes(a) == []
    # Without kueueQueueTools the tool Jobs run outside Kueue.
    plain = body_of(
        "trn1-nxd", runtime__kueueQueueName="trn1", resiliency={"preflight": {"enabled": False}}
    )
    (action,) = [a for a in run(plain, None).actions if isinstance(a, CreateChild)]
    assert "suspend" not in action.manifest["spec"]
