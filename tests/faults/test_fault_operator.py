"""Fault matrix, the control plane around the run: the operator killed at every phase
boundary, a run deleted while the operator is down, and a kube-apiserver restart
(docs/RELIABILITY.md, cases 5, 9 and 10).

Tool Jobs (tokenize, weights, export) are held behind a node label (`gate`) so each phase
lasts exactly as long as the test wants; PyTorchJobs (preflight, training) are finished with
KWOK pod annotations and `FakeTrainer`.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import pytest
from e2e.harness import FakeTrainer, OperatorProcess, Runs, committed_steps, s3_keys
from faults._support import fault_spec, gate, stays, uids

from fixtures.cluster import Cluster, devcluster, wait_for
from fixtures.s3 import S3Server

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

MAX_STEPS = 40
STAGE_CHILD = {
    "Preflight": "preflight",
    "Tokenizing": "tokenize",
    "PreparingWeights": "weights",
    "Training": "train-1",
    "Converting": "export",
}


def finish_master(runs: Runs, child: str) -> None:
    selector = f"training.kubeflow.org/job-name={child},training.kubeflow.org/replica-type=master"

    def running_master() -> Any:
        pods = [p for p in runs.pods(selector) if p["status"].get("phase") == "Running"]
        return pods[0] if pods else None

    pod = wait_for(running_master, timeout=60, what=f"running master of {child}")
    runs.finish_pod(pod["metadata"]["name"])


def child_exists(runs: Runs, run: str, child: str) -> bool:
    return child in runs.child_names(run)


def job_done(runs: Runs, run: str, child: str) -> bool:
    for j in runs.jobs(run) + runs.pytorchjobs(run):
        if j["metadata"]["name"] == child:
            conds = (j.get("status") or {}).get("conditions") or []
            return any(
                c["type"] in ("Complete", "Succeeded") and c["status"] == "True" for c in conds
            )
    return False


def complete_stage(runs: Runs, cluster: Cluster, run: str, phase: str, root: str) -> None:
    """Lets the stage of `phase` finish (while the operator is down)."""
    child = f"{run}-{STAGE_CHILD[phase]}"
    if phase in ("Preflight", "Training"):
        if phase == "Training":
            trainer = FakeTrainer(root)
            trainer.commit(MAX_STEPS)
            trainer.progress(attempt=1, step=MAX_STEPS, max_steps=MAX_STEPS, committed=MAX_STEPS)
        finish_master(runs, child)
    else:
        gate(cluster, True)
    wait_for(lambda: job_done(runs, run, child), timeout=60, what=f"{child} finished")
    gate(cluster, False)


# ------------------------------------------------------------------------------------ case 5


def test_the_operator_killed_at_every_phase_boundary_creates_no_duplicates_and_completes(
    runs: Runs, operator: OperatorProcess, fault_cluster: Cluster, bucket: str, s3_env: S3Server
) -> None:
    run = "phoenix"
    body = fault_spec(run, bucket, gated=True, resiliency={"preflight": {"enabled": True}})
    root = body["spec"]["checkpoints"]["s3Uri"]
    operator.kill()  # Pending -> Planning: the run arrives while no operator runs
    runs.create(body)
    operator.start()
    seen: dict[str, str] = {}
    for phase, component in STAGE_CHILD.items():
        runs.wait_phase(run, phase, timeout=120)
        child = f"{run}-{component}"
        wait_for(partial(child_exists, runs, run, child), timeout=30, what=f"{child} exists")
        operator.kill()  # at the boundary: the phase is recorded, its child just created
        operator.start()
        operator.kill()  # a crash loop right after the restart
        complete_stage(runs, fault_cluster, run, phase, root)
        operator.start()  # the stage finished while nobody watched
        now = uids(runs.jobs(run) + runs.pytorchjobs(run))
        for name, uid in seen.items():
            assert now.get(name) == uid, f"{name} was deleted or recreated"
        seen = now

    status = runs.wait_phase(run, "Succeeded", timeout=120)
    assert operator.starts == 2 + 2 * len(STAGE_CHILD)
    assert runs.child_names(run) == sorted(f"{run}-{c}" for c in STAGE_CHILD.values())
    assert uids(runs.jobs(run) + runs.pytorchjobs(run)) == seen
    assert status["attempt"] == 1 and len(status["attempts"]) == 1
    assert status["checkpoint"]["step"] == MAX_STEPS
    for kind in ("Jobs", "PyTorchJobs"):
        items = runs.jobs(run) if kind == "Jobs" else runs.pytorchjobs(run)
        names = [o["metadata"]["name"] for o in items]
        assert len(names) == len(set(names)), f"duplicate {kind}: {names}"
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    for t in ("Planned", "PreflightPassed", "DataReady", "WeightsReady", "Exported", "Succeeded"):
        assert conds[t] == "True", (t, conds)
    assert conds["Failed"] == "False"
    reasons = runs.event_reasons(run)
    assert "AttemptFailed" not in reasons and reasons.count("AttemptStarted") >= 1
    assert "Succeeded" in reasons


# ------------------------------------------------------------------------------------ case 9


def test_a_run_deleted_mid_training_loses_every_child_within_60s_but_keeps_its_s3_data(
    runs: Runs, operator: OperatorProcess, bucket: str, s3_env: S3Server
) -> None:
    body = fault_spec("gone", bucket)
    root = body["spec"]["checkpoints"]["s3Uri"]
    runs.create(body)
    runs.wait_phase("gone", "Training", timeout=120)
    runs.training_pods("gone", 1, count=2)
    trainer = FakeTrainer(root)
    trainer.commit(10)
    trainer.progress(attempt=1, step=13, max_steps=MAX_STEPS, committed=10)
    runs.wait(
        "gone",
        lambda s: (s.get("checkpoint") or {}).get("step") == 10,
        timeout=30,
        what="checkpoint 10 in status",
    )
    before = set(s3_keys(s3_env, bucket, "runs/gone/"))
    assert before

    operator.kill()  # cleanup must not depend on the operator (no finalizer)
    t0 = time.monotonic()
    runs.delete("gone")
    wait_for(lambda: runs.get("gone") is None, timeout=30, what="the run deleted")

    def children_left() -> list[str]:
        pods = [p["metadata"]["name"] for p in runs.pods("cpt.dev/run=gone")]
        return runs.child_names("gone") + pods

    wait_for(lambda: not children_left(), timeout=60, what="every child of the run gone")
    took = time.monotonic() - t0
    assert took < 60, f"children lingered {took:.0f}s"
    assert set(s3_keys(s3_env, bucket, "runs/gone/")) == before
    assert committed_steps(s3_env, bucket, "runs/gone/") == [10]

    operator.start()  # a restarted operator resurrects nothing of a deleted run
    stays(lambda: not children_left(), seconds=5, what="no child comes back")


# ------------------------------------------------------------------------------------ case 10


def test_the_operator_recovers_its_watches_after_a_kube_apiserver_restart(
    runs: Runs, operator: OperatorProcess, fault_cluster: Cluster, bucket: str, s3_env: S3Server
) -> None:
    # The default node grace: the restart makes KCM see stale node leases for a moment, and
    # a control plane blip must not cost a training attempt.
    body = fault_spec("outage", bucket, resiliency={"nodeNotReadySeconds": 60})
    root = body["spec"]["checkpoints"]["s3Uri"]
    runs.create(body)
    runs.wait_phase("outage", "Training", timeout=120)
    runs.training_pods("outage", 1, count=2)

    devcluster.stop_component("kube-apiserver", fault_cluster.state_dir)
    t0 = time.monotonic()
    trainer = FakeTrainer(root)  # the trainer keeps going while the control plane is away
    trainer.commit(10)
    trainer.progress(attempt=1, step=12, max_steps=MAX_STEPS, committed=10)
    assert not fault_cluster.api_url.startswith("http://")  # (the apiserver is TLS)
    # The outage lasts ~8 s: shorter than the node lease grace (20 s), so nodes stay Ready.
    while time.monotonic() - t0 < 8:
        assert operator.alive(), operator.log_tail()
        time.sleep(0.5)
    devcluster.start_component("kube-apiserver", fault_cluster.state_dir)
    assert operator.alive(), operator.log_tail()

    # The resync loop picks S3 progress up again ...
    runs.wait(
        "outage",
        lambda s: (s.get("checkpoint") or {}).get("step") == 10,
        timeout=60,
        what="checkpoint 10 after the restart",
    )
    # ... and the watches are back: a run created now is only known through the watch.
    runs.create(fault_spec("after", bucket, resiliency={"nodeNotReadySeconds": 60}))
    runs.wait_phase("after", "Training", timeout=120)
    # Child events still arrive: the master finishing moves `outage` on.
    trainer.commit(MAX_STEPS)
    trainer.progress(attempt=1, step=MAX_STEPS, max_steps=MAX_STEPS, committed=MAX_STEPS)
    finish_master(runs, "outage-train-1")
    status = runs.wait_phase("outage", "Succeeded", timeout=120)
    assert status["attempt"] == 1 and status["checkpoint"]["step"] == MAX_STEPS
    assert "AttemptFailed" not in runs.event_reasons("outage")
    assert runs.status("after")["attempt"] == 1
