"""Fault matrix, training stage: a failed worker, a NotReady node, pods stuck Pending, a hang,
and a retry budget running out (docs/RELIABILITY.md, cases 1-4 and 7).

The operator runs as its own process against a private control plane; KWOK plays the trn1
nodes. `FakeTrainer` writes what rank 0 of the trainer writes (progress.json, committed
checkpoints) with the workload's own storage code; the checkpoint the trainer would restore
is computed with the workload's own `latest_committed`.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from e2e.harness import FakeTrainer, Runs, committed_steps
from faults._support import (
    condition,
    fault_spec,
    occupy_nodes,
    stays,
    wait_attempt,
)

from cpt_training import storage
from cpt_training.checkpoint import latest_committed
from fixtures.cluster import Cluster, wait_for
from fixtures.s3 import S3Server

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

MAX_STEPS = 40
EVERY = 10


def start_training(runs: Runs, body: dict[str, Any], *, attempt: int = 1) -> list[Any]:
    run = body["metadata"]["name"]
    runs.create(body)
    runs.wait_phase(run, "Training", timeout=120)
    return runs.training_pods(run, attempt, count=2, timeout=90)


def finish(runs: Runs, run: str, attempt: int, trainer: FakeTrainer) -> dict[str, Any]:
    """The trainer reaches maxSteps and the master exits 0: the run exports and succeeds."""
    trainer.commit(MAX_STEPS)
    trainer.progress(attempt=attempt, step=MAX_STEPS, max_steps=MAX_STEPS, committed=MAX_STEPS)
    pods = runs.training_pods(run, attempt, count=2)
    master = next(p for p in pods if "-master-" in p["metadata"]["name"])
    runs.finish_pod(master["metadata"]["name"])
    return runs.wait_phase(run, "Succeeded", timeout=90)


def events_of(runs: Runs, run: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in runs.events(run) if e["reason"] == reason]


def no_training_left(runs: Runs, run: str, attempt: int) -> bool:
    names = [j["metadata"]["name"] for j in runs.pytorchjobs(run)]
    pods = runs.pods(f"cpt.dev/run={run},cpt.dev/attempt={attempt}")
    return f"{run}-train-{attempt}" not in names and not pods


# ------------------------------------------------------------------------------------ case 1


def test_a_worker_failing_mid_training_resumes_attempt_2_from_the_last_committed_checkpoint(
    runs: Runs, bucket: str, s3_env: S3Server
) -> None:
    body = fault_spec("wfail", bucket)
    root = body["spec"]["checkpoints"]["s3Uri"]
    pods = start_training(runs, body)
    trainer = FakeTrainer(root)
    trainer.commit(10)
    trainer.commit(20)
    # The step-30 save is in flight when the worker dies: files uploaded, no commit marker.
    storage.write_bytes(root + "step_30/model.pt", b"half a checkpoint")
    trainer.progress(attempt=1, step=27, max_steps=MAX_STEPS, committed=20)
    runs.wait(
        "wfail",
        lambda s: (
            (s.get("checkpoint") or {}).get("step") == 20
            and (s.get("progress") or {}).get("step") == 27
        ),
        timeout=30,
        what="checkpoint 20 and step 27 in status",
    )

    worker = next(p for p in pods if "-worker-" in p["metadata"]["name"])
    runs.finish_pod(worker["metadata"]["name"], ok=False, exit_code=137)
    status = wait_attempt(runs, "wfail", 2)

    # Resumes from the newest *committed* checkpoint, never the partial step_30.
    assert status["resumeFrom"]["step"] == 20
    assert status["resumeFrom"]["uri"].rstrip("/") == root + "step_20"
    first, second = status["attempts"][0], status["attempts"][1]
    assert first["reason"] == "PodFailed", first
    assert worker["metadata"]["name"] in first["message"] and "exit code 137" in first["message"]
    assert second["resumeFromStep"] == 20
    lost = 27 - status["resumeFrom"]["step"]
    assert 0 <= lost <= EVERY, f"{lost} steps lost, more than one checkpoint interval"
    training = condition(status, "Training")
    assert training["status"] == "True" and "resuming from step 20" in training["message"]
    assert latest_committed(root) is not None and latest_committed(root).step == 20  # type: ignore[union-attr]

    (ptj,) = [j for j in runs.pytorchjobs("wfail") if j["metadata"]["name"] == "wfail-train-2"]
    assert ptj["metadata"]["annotations"]["cpt.dev/expected-resume-step"] == "20"
    master_env = ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    stage = next(e["value"] for e in master_env["env"] if e["name"] == "CPT_STAGE_CONFIG")
    assert '"attempt":2' in stage and f'"uri":"{root}"' in stage

    failed = events_of(runs, "wfail", "AttemptFailed")
    assert len(failed) == 1 and failed[0]["type"] == "Warning"
    assert "attempt 1 of 3: PodFailed" in failed[0]["message"]
    started = [e["message"] for e in events_of(runs, "wfail", "AttemptStarted")]
    assert any("resuming from step 20" in m for m in started), started
    wait_for(lambda: no_training_left(runs, "wfail", 1), timeout=30, what="attempt 1 removed")

    runs.training_pods("wfail", 2, count=2)
    trainer.commit(30)
    status = finish(runs, "wfail", 2, trainer)
    assert status["checkpoint"]["step"] == MAX_STEPS
    assert committed_steps(s3_env, bucket, "runs/wfail/") == [10, 20, 30, 40]


# ------------------------------------------------------------------------------------ case 2


def test_a_node_going_not_ready_replaces_the_attempt_on_other_nodes(
    runs: Runs, fault_cluster: Cluster, bucket: str, s3_env: S3Server
) -> None:
    body = fault_spec("nodefail", bucket, resiliency={"nodeNotReadySeconds": 4})
    pods = start_training(runs, body)
    trainer = FakeTrainer(body["spec"]["checkpoints"]["s3Uri"])
    trainer.commit(10)
    trainer.progress(attempt=1, step=14, max_steps=MAX_STEPS, committed=10)
    worker = next(p for p in pods if "-worker-" in p["metadata"]["name"])
    bad = worker["spec"]["nodeName"]

    fault_cluster.set_node_ready(bad, False)
    t0 = time.monotonic()
    status = wait_attempt(runs, "nodefail", 2, timeout=120)
    first = status["attempts"][0]
    assert first["reason"] == "NodeNotReady", first
    assert bad in first["message"] and "NotReady" in first["message"]
    assert status["resumeFrom"]["step"] == 10
    # Attempt 1's pods are gone, including the one no kubelet will ever confirm deleted.
    wait_for(lambda: no_training_left(runs, "nodefail", 1), timeout=30, what="attempt 1 removed")
    pods2 = runs.training_pods("nodefail", 2, count=2, timeout=60)
    nodes2 = {p["spec"]["nodeName"] for p in pods2}
    assert bad not in nodes2 and len(nodes2) == 2, nodes2
    # Two things keep attempt 2 off the bad node: the lifecycle controller's NoSchedule taint,
    # which the training pods do not tolerate, and (once the taint is gone, see case 2b) the
    # operator's own exclusion.
    taints = runs.api.get(f"/api/v1/nodes/{bad}")["spec"].get("taints") or []
    assert any(
        t["key"] in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
        and t["effect"] == "NoSchedule"
        for t in taints
    ), taints
    ptj2 = next(j for j in runs.pytorchjobs("nodefail") if j["metadata"]["name"].endswith("-2"))
    template = ptj2["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert not any(
        t.get("key", "").startswith("node.kubernetes.io/") for t in template.get("tolerations", [])
    )
    assert avoided_nodes(ptj2) == [[bad], [bad]]
    assert [(e["node"], e["reason"]) for e in status["excludedNodes"]] == [(bad, "NodeNotReady")]
    failed = events_of(runs, "nodefail", "AttemptFailed")
    assert len(failed) == 1 and "NodeNotReady" in failed[0]["message"]
    assert time.monotonic() - t0 < 90

    fault_cluster.set_node_ready(bad, True)
    status = finish(runs, "nodefail", 2, trainer)
    assert status["attempt"] == 2 and committed_steps(s3_env, bucket, "runs/nodefail/")[0] == 10


def avoided_nodes(ptj: dict[str, Any]) -> list[list[str]]:
    """Per replica: the nodes its required node affinity keeps it off (hostname NotIn)."""
    out = []
    for replica in ptj["spec"]["pytorchReplicaSpecs"].values():
        affinity = replica["template"]["spec"].get("affinity") or {}
        required = (affinity.get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        ) or {}
        for term in required.get("nodeSelectorTerms") or [{}]:
            out.append(
                [
                    v
                    for e in term.get("matchExpressions") or []
                    if e["key"] == "kubernetes.io/hostname" and e["operator"] == "NotIn"
                    for v in e["values"]
                ]
            )
    return out


def test_a_node_that_failed_an_attempt_gets_no_later_attempt_even_once_it_is_ready_again(
    runs: Runs, fault_cluster: Cluster, fault_ns: str, bucket: str, s3_env: S3Server
) -> None:
    pending = 20
    body = fault_spec(
        "exclude",
        bucket,
        resiliency={"nodeNotReadySeconds": 4, "pendingTimeoutSeconds": pending},
    )
    pods = start_training(runs, body)
    trainer = FakeTrainer(body["spec"]["checkpoints"]["s3Uri"])
    trainer.commit(10)
    trainer.progress(attempt=1, step=14, max_steps=MAX_STEPS, committed=10)
    nodes = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods}
    bad = next(n for name, n in nodes.items() if "-worker-" in name)
    good = next(n for name, n in nodes.items() if "-master-" in name)
    # Every other trn1 node is taken: attempt 2 can only have `good` and, were it not
    # excluded, `bad`.
    others = [f"trn1-{i}" for i in range(4) if f"trn1-{i}" not in (bad, good)]
    holders = occupy_nodes(fault_cluster, fault_ns, others)

    fault_cluster.set_node_ready(bad, False)
    status = wait_attempt(runs, "exclude", 2, timeout=120)
    assert status["attempts"][0]["reason"] == "NodeNotReady"
    (excluded,) = status["excludedNodes"]
    assert (excluded["node"], excluded["reason"], excluded["attempt"]) == (bad, "NodeNotReady", 1)
    assert excluded["since"]
    (event,) = events_of(runs, "exclude", "NodeExcluded")
    assert event["type"] == "Warning" and f"node {bad} is excluded" in event["message"]
    ptj2 = next(
        j for j in runs.pytorchjobs("exclude") if j["metadata"]["name"] == "exclude-train-2"
    )
    assert avoided_nodes(ptj2) == [[bad], [bad]]

    # The node comes back (Ready, not-ready taint lifted: set_node_ready waits for both). The
    # scheduler would now place attempt 2's second pod there; the exclusion keeps it Pending.
    fault_cluster.set_node_ready(bad, True)
    current = runs.status("exclude")
    assert current["attempt"] == 2 and not current["attempts"][1].get("reason"), (
        "attempt 2 timed out before the node was Ready again; raise `pending`"
    )

    def nothing_on_bad() -> bool:
        return all(
            p["spec"].get("nodeName") != bad
            for p in runs.pods("cpt.dev/run=exclude,cpt.dev/stage=train")
        )

    stays(nothing_on_bad, seconds=4, what=f"no training pod on the excluded node {bad}")
    status = runs.wait(
        "exclude",
        lambda s: len(s.get("attempts") or []) >= 2 and s["attempts"][1].get("reason"),
        timeout=60,
        what="attempt 2 ended",
    )
    second = status["attempts"][1]
    assert second["reason"] == "PendingTimeout", second
    assert f"Pending for more than {pending}s" in second["message"]
    assert (
        f"1 node is excluded by this run after failing an earlier attempt: {bad} "
        in (second["message"])
    )
    assert "node affinity" in second["message"], second["message"]  # the scheduler's words
    assert nothing_on_bad()

    # Capacity frees up: attempt 3 runs on `good` and the freed node, still not on `bad`.
    runs.api.delete(f"/api/v1/namespaces/{fault_ns}/pods/{holders[0]}")
    wait_attempt(runs, "exclude", 3, timeout=60)
    pods3 = runs.training_pods("exclude", 3, count=2, timeout=60)
    assert {p["spec"]["nodeName"] for p in pods3} == {good, others[0]}
    status = finish(runs, "exclude", 3, trainer)
    assert [a["reason"] for a in status["attempts"]] == [
        "NodeNotReady",
        "PendingTimeout",
        "Completed",
    ]
    assert [e["node"] for e in status["excludedNodes"]] == [bad]
    assert status["attempts"][2]["resumeFromStep"] == 10


# ------------------------------------------------------------------------------------ case 3


def test_pods_pending_past_the_timeout_are_retried_and_then_fail_the_run_saying_why(
    runs: Runs, fault_cluster: Cluster, fault_ns: str, bucket: str
) -> None:
    occupy_nodes(fault_cluster, fault_ns, ["trn1-1", "trn1-2", "trn1-3"])
    body = fault_spec("pend", bucket, resiliency={"pendingTimeoutSeconds": 5, "maxAttempts": 2})
    runs.create(body)
    status = runs.wait(
        "pend",
        lambda s: len(s.get("attempts") or []) >= 1 and s["attempts"][0].get("reason"),
        timeout=120,
        what="attempt 1 ended",
    )
    first = status["attempts"][0]
    assert first["reason"] == "PendingTimeout", first
    assert "Pending for more than 5s" in first["message"]
    assert "Insufficient aws.amazon.com/neuron" in first["message"], first["message"]

    status = runs.wait_phase("pend", "Failed", timeout=120)
    failed = condition(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "MaxAttemptsExceeded"
    assert "all 2 training attempts failed" in failed["message"]
    assert "PendingTimeout" in failed["message"] and "Insufficient" in failed["message"]
    assert condition(status, "Training")["reason"] == "MaxAttemptsExceeded"
    assert [a["reason"] for a in status["attempts"]] == ["PendingTimeout", "PendingTimeout"]
    assert len(events_of(runs, "pend", "AttemptFailed")) == 2
    assert any(e["type"] == "Warning" for e in events_of(runs, "pend", "Failed"))
    # Training children are cleaned; the finished data Jobs stay for their logs.
    wait_for(
        lambda: (
            not runs.pytorchjobs("pend") and not runs.pods("cpt.dev/run=pend,cpt.dev/stage=train")
        ),
        timeout=30,
        what="training children removed",
    )
    assert runs.child_names("pend") == ["pend-tokenize", "pend-weights"]


def test_a_run_pending_for_capacity_retries_and_runs_once_nodes_free_up(
    runs: Runs, fault_cluster: Cluster, fault_ns: str, bucket: str, s3_env: S3Server
) -> None:
    holders = occupy_nodes(fault_cluster, fault_ns, ["trn1-1", "trn1-2", "trn1-3"])
    body = fault_spec("capacity", bucket, resiliency={"pendingTimeoutSeconds": 5})
    runs.create(body)
    runs.wait(
        "capacity",
        lambda s: (s.get("attempts") or [{}])[0].get("reason") == "PendingTimeout",
        timeout=120,
        what="attempt 1 timed out pending",
    )
    for name in holders:
        runs.api.delete(f"/api/v1/namespaces/{fault_ns}/pods/{name}")
    wait_attempt(runs, "capacity", 2)
    runs.training_pods("capacity", 2, count=2, timeout=60)
    status = finish(runs, "capacity", 2, FakeTrainer(body["spec"]["checkpoints"]["s3Uri"]))
    assert [a.get("reason") for a in status["attempts"]] == ["PendingTimeout", "Completed"]


# ------------------------------------------------------------------------------------ case 4


def test_a_hang_without_step_progress_replaces_the_attempt_but_steady_progress_does_not(
    runs: Runs, bucket: str, s3_env: S3Server
) -> None:
    hang = 10
    body = fault_spec("hang", bucket, resiliency={"hangTimeoutSeconds": hang})
    start_training(runs, body)
    trainer = FakeTrainer(body["spec"]["checkpoints"]["s3Uri"])
    trainer.commit(10)

    # Slow but steady: a step every 1.5 s for twice the hang timeout must not restart anything.
    step = 10
    deadline = time.monotonic() + 2 * hang
    while time.monotonic() < deadline:
        step += 1
        trainer.progress(attempt=1, step=step, max_steps=MAX_STEPS, committed=10)
        stays(
            lambda: runs.status("hang").get("attempt") == 1,
            seconds=1.5,
            what="attempt 1 keeps running while steps advance",
        )
    assert not events_of(runs, "hang", "AttemptFailed")

    # Then the trainer stops making progress (a stuck collective): the attempt is replaced.
    t0 = time.monotonic()
    status = wait_attempt(runs, "hang", 2, timeout=60)
    first = status["attempts"][0]
    assert first["reason"] == "NoProgress", first
    assert f"no training progress for more than {hang}s (still at step {step})" in first["message"]
    assert first["lastStep"] == step
    assert time.monotonic() - t0 >= hang - 7  # not before the timeout (cache + resync slack)
    assert status["resumeFrom"]["step"] == 10
    wait_for(lambda: no_training_left(runs, "hang", 1), timeout=30, what="attempt 1 removed")
    finish(runs, "hang", 2, trainer)


# ------------------------------------------------------------------------------------ case 7


def test_an_exhausted_retry_budget_fails_the_run_with_every_reason_and_keeps_checkpoints(
    runs: Runs, bucket: str, s3_env: S3Server
) -> None:
    body = fault_spec("budget", bucket, resiliency={"maxAttempts": 3, "hangTimeoutSeconds": 8})
    pods = start_training(runs, body)
    trainer = FakeTrainer(body["spec"]["checkpoints"]["s3Uri"])
    trainer.commit(10)
    trainer.progress(attempt=1, step=12, max_steps=MAX_STEPS, committed=10)

    worker = next(p for p in pods if "-worker-" in p["metadata"]["name"])
    runs.finish_pod(worker["metadata"]["name"], ok=False, exit_code=1)  # attempt 1: pod fails
    wait_attempt(runs, "budget", 2)
    runs.training_pods("budget", 2, count=2)  # attempt 2: hangs (no progress at all)
    wait_attempt(runs, "budget", 3, timeout=60)
    pods = runs.training_pods("budget", 3, count=2)
    master = next(p for p in pods if "-master-" in p["metadata"]["name"])
    runs.finish_pod(master["metadata"]["name"], ok=False, exit_code=2)  # attempt 3: fails

    status = runs.wait_phase("budget", "Failed", timeout=60)
    assert [a["reason"] for a in status["attempts"]] == ["PodFailed", "NoProgress", "PodFailed"]
    failed = condition(status, "Failed")
    assert failed["reason"] == "MaxAttemptsExceeded"
    assert failed["message"].startswith("all 3 training attempts failed; the last one: PodFailed")
    assert "exit code 2" in failed["message"]
    assert condition(status, "Succeeded")["status"] == "False"
    assert status["message"].startswith("MaxAttemptsExceeded")
    assert status.get("completionTime")
    assert len(events_of(runs, "budget", "AttemptFailed")) == 3
    wait_for(
        lambda: (
            not runs.pytorchjobs("budget")
            and not runs.pods("cpt.dev/run=budget,cpt.dev/stage=train")
        ),
        timeout=30,
        what="training children removed",
    )
    # Failed is final: no attempt 4 appears over several resync periods, and nothing in S3 goes.
    stays(
        lambda: runs.status("budget").get("attempt") == 3 and not runs.pytorchjobs("budget"),
        seconds=5,
        what="a failed run stays failed",
    )
    assert committed_steps(s3_env, bucket, "runs/budget/") == [10]
    assert runs.status("budget")["checkpoint"]["step"] == 10


def test_training_pods_the_cluster_refuses_to_create_end_the_attempt_saying_why(
    runs: Runs, fault_ns: str, bucket: str
) -> None:
    # One pod at a time: the data Jobs (one shard) pass, the training Worker is refused by the
    # quota. It never exists, so it can never be Pending: only the pod count tells.
    runs.api.create(
        f"/api/v1/namespaces/{fault_ns}/resourcequotas",
        {"metadata": {"name": "one-pod"}, "spec": {"hard": {"pods": "1"}}},
    )
    body = fault_spec(
        "quota", bucket, data__shards=1, resiliency={"pendingTimeoutSeconds": 5, "maxAttempts": 1}
    )
    runs.create(body)
    status = runs.wait_phase("quota", "Failed", timeout=120)
    (attempt,) = status["attempts"]
    assert attempt["reason"] == "PendingTimeout", attempt
    assert "PyTorchJob quota-train-1 has 1 of 2 pods after 5s" in attempt["message"]
    failed = condition(status, "Failed")
    assert failed["reason"] == "MaxAttemptsExceeded" and "1 of 2 pods" in failed["message"]
    wait_for(
        lambda: not runs.pytorchjobs("quota"),
        timeout=30,
        what="the attempt removed",
    )
