"""Decision tables of a run on a shared, preemptible cluster: preempted attempts (the
trainer's exit 75, a deleted or evicted pod, a scheduler preemption) resume without spending
the retry budget, the grace period cpt gives the trainer to checkpoint, and the run's
deadline (activeDeadlineSeconds, suspended time excluded)."""

from __future__ import annotations

import json
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
    job,
    node,
    pod,
    ptj,
    run,
    status_in,
    ts,
)

from cpt_operator.builders import pytorchjob
from cpt_operator.reconcile import conditions as cond
from cpt_operator.reconcile.actions import CreateChild, EmitEvent
from cpt_operator.reconcile.observe import Checkpoint
from cpt_training.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.unit

NODES = [node("trn1-0"), node("trn1-1")]
TRAIN_1 = "llama-cpt-train-1"


def training(body: dict[str, Any]) -> dict[str, Any]:
    return status_in("Training", body)


def disrupted(name: str, owner: str, reason: str, node_name: str) -> dict[str, Any]:
    obj = pod(name, owner, node=node_name, deleting=True)
    obj["status"]["conditions"] = [
        {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": "x"}
    ]
    return obj


def stopped_gang(attempt: int = 1) -> list[dict[str, Any]]:
    return gang(attempt, phase="Failed", exit_code=EXIT_PREEMPTED)


# -- preemption --------------------------------------------------------------------------------


def test_a_trainer_that_stopped_with_exit_75_is_preempted_not_failed_and_attempt_2_follows() -> (
    None
):
    body = body_of("trn1-nxd")
    d = run(body, training(body), pytorchjobs=[ptj(TRAIN_1, 1)], pods=stopped_gang(), nodes=NODES)
    assert d.status["phase"] == "Training" and d.status["attempt"] == 2
    first = d.status["attempts"][0]
    assert first["reason"] == cond.PREEMPTED and "exit code 75" in first["message"]
    assert ("Normal", "AttemptPreempted") in events(d)
    assert ("Warning", "AttemptFailed") not in events(d)
    assert ("PyTorchJob", TRAIN_1, None) in deletes(d)
    assert "preemptions do not count against maxAttempts" in d.status["message"]


@pytest.mark.parametrize(
    "reason", ["PreemptionByScheduler", "EvictionByEvictionAPI", "TerminationByKubelet"]
)
def test_a_pod_the_cluster_disrupts_ends_the_attempt_as_preempted(reason: str) -> None:
    body = body_of("trn1-nxd")
    pods = gang(1)
    pods[1] = disrupted(f"{TRAIN_1}-worker-0", TRAIN_1, reason, "trn1-1")
    d = run(body, training(body), pytorchjobs=[ptj(TRAIN_1, 1)], pods=pods, nodes=NODES)
    first = d.status["attempts"][0]
    assert first["reason"] == cond.PREEMPTED and reason in first["message"]
    assert d.status["phase"] == "Training" and d.status["attempt"] == 2


def test_a_pod_deleted_with_a_grace_period_is_a_preemption() -> None:
    body = body_of("trn1-nxd")
    pods = gang(1)
    pods[0] = pod(f"{TRAIN_1}-master-0", TRAIN_1, node="trn1-0", deleting=True)
    d = run(body, training(body), pytorchjobs=[ptj(TRAIN_1, 1)], pods=pods, nodes=NODES)
    assert d.status["attempts"][0]["reason"] == cond.PREEMPTED
    assert "deleted" in d.status["attempts"][0]["message"]


def test_a_worker_that_failed_makes_a_failure_though_the_master_is_being_deleted_after_it() -> None:
    """The training operator deletes the other replicas once one fails: those deletions
    follow the failure and do not make it a preemption."""
    body = body_of("trn1-nxd")
    pods = [
        pod(f"{TRAIN_1}-master-0", TRAIN_1, node="trn1-0", deleting=True),
        pod(f"{TRAIN_1}-worker-0", TRAIN_1, node="trn1-1", phase="Failed", exit_code=137),
    ]
    d = run(body, training(body), pytorchjobs=[ptj(TRAIN_1, 1)], pods=pods, nodes=NODES)
    first = d.status["attempts"][0]
    assert first["reason"] == cond.POD_FAILED and "exit code 137" in first["message"]


def test_a_deleted_pod_on_a_not_ready_node_is_a_node_failure_not_a_preemption() -> None:
    body = body_of("trn1-nxd")
    pods = gang(1)
    pods[1] = pod(f"{TRAIN_1}-worker-0", TRAIN_1, node="trn1-1", deleting=True)
    nodes = [node("trn1-0"), node("trn1-1", ready=False, since=T0 - timedelta(hours=1))]
    d = run(body, training(body), pytorchjobs=[ptj(TRAIN_1, 1)], pods=pods, nodes=nodes)
    assert d.status["attempts"][0]["reason"] == cond.NODE_NOT_READY


def test_preemptions_never_exhaust_max_attempts_and_failures_still_do() -> None:
    body = body_of("trn1-nxd", resiliency={"maxAttempts": 1})
    status = training(body)
    for n in (1, 2, 3):  # three preemptions in a row with maxAttempts 1
        name = f"llama-cpt-train-{n}"
        d = run(body, status, pytorchjobs=[ptj(name, n)], pods=stopped_gang(n), nodes=NODES)
        assert d.status["phase"] == "Training" and d.status["attempt"] == n + 1
        started = run(body, d.status, checkpoint=Checkpoint(10 * n, f"s3://c/step_{10 * n}"))
        assert creates(started) == [f"llama-cpt-train-{n + 1}"]
        assert started.status["resumeFrom"]["step"] == 10 * n
        status = started.status
    failing = run(
        body,
        status,
        pytorchjobs=[ptj("llama-cpt-train-4", 4, condition="Failed", message="worker exited 1")],
        pods=gang(4),
        nodes=NODES,
    )
    assert failing.status["phase"] == "Failed"
    assert condition(failing.status, "Failed")["reason"] == cond.MAX_ATTEMPTS_EXCEEDED
    reasons = [a["reason"] for a in failing.status["attempts"]]
    assert reasons == [cond.PREEMPTED] * 3 + [cond.JOB_FAILED]


def test_a_failure_after_a_preemption_says_how_much_of_the_budget_is_used() -> None:
    body = body_of("trn1-nxd")  # maxAttempts 3
    status = training(body)
    d = run(body, status, pytorchjobs=[ptj(TRAIN_1, 1)], pods=stopped_gang(), nodes=NODES)
    status = run(body, d.status).status
    pods = gang(2)
    pods[1] = pod(
        "llama-cpt-train-2-worker-0", "llama-cpt-train-2", phase="Failed", exit_code=1, attempt=2
    )
    failed = run(
        body, status, pytorchjobs=[ptj("llama-cpt-train-2", 2)], pods=pods, nodes=NODES
    ).status
    assert failed["phase"] == "Training" and failed["attempt"] == 3
    assert "(1 of 3 failures used)" in failed["message"]


# -- the grace period --------------------------------------------------------------------------


def train_manifest(d: Any) -> dict[str, Any]:
    (action,) = [a for a in d.actions if isinstance(a, CreateChild) and "-train-" in a.name]
    manifest: dict[str, Any] = action.manifest
    return manifest


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    return spec


def test_the_grace_period_comes_from_the_measured_save_time_within_the_spec_bound() -> None:
    body = body_of("trn1-nxd", resiliency={"maxTerminationGracePeriodSeconds": 200})
    status = training(body)
    d = run(body, status, pytorchjobs=[ptj(TRAIN_1, 1)], pods=stopped_gang(), nodes=NODES)
    prog = {"attempt": 1, "step": 10, "lastCommittedStep": 10, "lastCommitSeconds": 40.0}
    ckpt = Checkpoint(10, "s3://c/step_10")
    started = run(body, d.status, progress=prog, checkpoint=ckpt)
    spec = pod_spec(train_manifest(started))
    step_s = started.status["plan"].get("estStepSeconds") or 0.0
    expected = min(max(int(step_s + 1.5 * 40 + 30 + 0.999), 60), 200)
    assert spec["terminationGracePeriodSeconds"] == expected
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["PET_SHUTDOWN_TIMEOUT"] == str(expected - 5)
    assert spec["containers"][0]["command"] == ["cpt-torchrun"]
    assert started.status["checkpoint"]["saveSeconds"] == 40.0


def test_the_grace_period_is_bounded_by_the_spec_and_floored_at_a_minute() -> None:
    spec = body_of("trn1-nxd", resiliency={"maxTerminationGracePeriodSeconds": 90})["spec"]
    from cpt_operator.api.models import ContinualPretrainSpec

    s = ContinualPretrainSpec.model_validate(spec)
    slow = pytorchjob.termination_grace_seconds(
        s, step_seconds=30, checkpoint_gib=500, save_seconds=None
    )
    fast = pytorchjob.termination_grace_seconds(
        s, step_seconds=0.1, checkpoint_gib=None, save_seconds=1
    )
    assert slow == 90 and fast == 60


# -- deadline ----------------------------------------------------------------------------------


def test_past_the_deadline_the_trainer_is_stopped_and_the_run_fails_once_its_pods_are_gone() -> (
    None
):
    body = body_of("trn1-nxd", resiliency={"activeDeadlineSeconds": 3600})
    status = training(body)
    later = T0 + timedelta(seconds=3601)
    d = run(body, status, later, pytorchjobs=[ptj(TRAIN_1, 1)], pods=gang(1), nodes=NODES)
    assert d.status["phase"] == "Training"
    assert ("PyTorchJob", TRAIN_1, None) in deletes(d)
    assert ("Warning", cond.DEADLINE_EXCEEDED) in events(d)
    assert "activeDeadlineSeconds (3600s) reached" in d.status["message"]
    saving = run(body, d.status, later, pods=gang(1, deleting=True), nodes=NODES)
    assert saving.status["phase"] == "Training" and creates(saving) == []
    assert ("Warning", cond.DEADLINE_EXCEEDED) not in events(saving)  # said once
    done = run(body, saving.status, later, checkpoint=Checkpoint(33, "s3://c/step_33"))
    assert done.status["phase"] == "Failed"
    failed = condition(done.status, "Failed")
    assert failed["reason"] == cond.DEADLINE_EXCEEDED and "step 33" in failed["message"]
    assert done.status["checkpoint"]["step"] == 33
    assert condition(done.status, "Training")["reason"] == cond.DEADLINE_EXCEEDED


def test_before_the_deadline_nothing_happens_and_without_one_never() -> None:
    body = body_of("trn1-nxd", resiliency={"activeDeadlineSeconds": 3600})
    seen = dict(pytorchjobs=[ptj(TRAIN_1, 1)], pods=gang(1), nodes=NODES)
    early = run(body, training(body), T0 + timedelta(seconds=3500), **seen)
    assert deletes(early) == [] and early.status["phase"] == "Training"
    plain = body_of("trn1-nxd")
    years = run(plain, training(plain), T0 + timedelta(days=400), **seen)
    assert deletes(years) == []


def test_suspended_time_does_not_count_against_the_deadline() -> None:
    body = body_of("trn1-nxd", resiliency={"activeDeadlineSeconds": 3600})
    status = training(body)
    body["spec"]["suspend"] = True
    at = T0 + timedelta(seconds=600)
    suspended = run(body, status, at, pytorchjobs=[ptj(TRAIN_1, 1)]).status
    # Two hours suspended: past the deadline on the wall clock, but the run is not active.
    still = run(body, suspended, at + timedelta(hours=2))
    assert still.status["phase"] == "Suspended"
    body["spec"]["suspend"] = False
    resumed = run(body, suspended, at + timedelta(hours=2))
    assert resumed.status["suspendedSeconds"] == 7200
    assert resumed.status["phase"] == "Training" and creates(resumed) == [TRAIN_1]
    # 600 s before plus 2999 s after the suspension: still inside the hour.
    inside = run(
        body,
        resumed.status,
        at + timedelta(hours=2, seconds=2999),
        pytorchjobs=[ptj(TRAIN_1, 1)],
        pods=gang(1),
        nodes=NODES,
    )
    assert deletes(inside) == []
    past = run(
        body,
        resumed.status,
        at + timedelta(hours=2, seconds=3001),
        pytorchjobs=[ptj(TRAIN_1, 1)],
        pods=gang(1),
        nodes=NODES,
    )
    assert ("PyTorchJob", TRAIN_1, None) in deletes(past)


def test_the_planner_warns_when_the_estimated_training_time_exceeds_the_deadline() -> None:
    from cpt_operator.api import planner
    from cpt_operator.api.models import ContinualPretrainSpec

    spec = body_of("trn1-nxd", resiliency={"activeDeadlineSeconds": 3600})["spec"]
    spec["training"]["maxSteps"] = 100_000  # about 4 h at the calibrated step time
    plan = planner.plan(ContinualPretrainSpec.model_validate(spec), mode="cluster")
    (warning,) = [w for w in plan.warnings if w.field == "spec.resiliency.activeDeadlineSeconds"]
    assert "less than the estimated training time" in warning.message
    roomy = body_of("trn1-nxd", resiliency={"activeDeadlineSeconds": 365 * 86400})["spec"]
    plan = planner.plan(ContinualPretrainSpec.model_validate(roomy), mode="cluster")
    assert not [w for w in plan.warnings if "activeDeadlineSeconds" in w.field]


# -- preflight in status -------------------------------------------------------------------------

PREFLIGHT_RESULT = {
    "stage": "preflight",
    "ok": False,
    "worldSize": 64,
    "busBandwidthGbps": 41.237,
    "bestBusBandwidthGbps": 44.9,
    "minBusBandwidthGbps": 50.0,
    "problems": ["bus bandwidth 41.24 Gbps is below minBusBandwidthGbps 50.0", "rank 33: x"],
    "ranks": [
        {"rank": 0, "host": "llama-cpt-preflight-master-0", "problems": []},
        {"rank": 33, "host": "llama-cpt-preflight-worker-0", "problems": ["x"]},
    ],
}


def test_the_preflight_measurement_goes_into_status_and_an_event_whatever_the_verdict() -> None:
    body = body_of("trn1-nxd", resiliency={"preflight": {"minBusBandwidthGbps": 50.0}})
    status = run(body, None).status
    assert status["phase"] == "Preflight"
    d = run(
        body,
        status,
        pytorchjobs=[ptj("llama-cpt-preflight", condition="Failed")],
        preflight=PREFLIGHT_RESULT,
    )
    assert d.status["phase"] == "Failed"
    pf = d.status["preflight"]
    assert pf["passed"] is False and pf["busBandwidthGbps"] == 41.24
    assert pf["minBusBandwidthGbps"] == 50.0 and pf["worldSize"] == 64
    assert pf["failingNodes"] == ["llama-cpt-preflight-worker-0"]
    assert ("Warning", "PreflightMeasured") in events(d)
    ok = {**PREFLIGHT_RESULT, "ok": True, "busBandwidthGbps": 80.0, "problems": [], "ranks": []}
    passed = run(
        body, status, pytorchjobs=[ptj("llama-cpt-preflight", condition="Succeeded")], preflight=ok
    )
    assert passed.status["phase"] == "Tokenizing"
    assert passed.status["preflight"]["passed"] is True
    assert ("Normal", "PreflightMeasured") in events(passed)
    # Still running: nothing recorded yet.
    running = run(body, status, pytorchjobs=[ptj("llama-cpt-preflight")], preflight=ok)
    assert "preflight" not in running.status


def deadline_stop(body: dict[str, Any]) -> Any:
    """A training run stopped by its deadline, step 33 committed, its pods gone."""
    later = T0 + timedelta(seconds=3601)
    d = run(body, training(body), later, pytorchjobs=[ptj(TRAIN_1, 1)], pods=gang(1), nodes=NODES)
    return run(body, d.status, later, checkpoint=Checkpoint(33, "s3://c/step_33"))


def test_with_export_on_deadline_the_newest_checkpoint_is_exported_and_the_run_still_fails() -> (
    None
):
    body = body_of("trn1-nxd", resiliency={"activeDeadlineSeconds": 3600, "exportOnDeadline": True})
    d = deadline_stop(body)
    assert d.status["phase"] == "Converting" and creates(d) == ["llama-cpt-export"]
    said = [a.message for a in d.actions if isinstance(a, EmitEvent)]
    assert any("exportOnDeadline" in m for m in said), said
    later = T0 + timedelta(hours=2)
    running = job("llama-cpt-export")
    running["metadata"]["creationTimestamp"] = ts(later - timedelta(seconds=5))
    running["status"]["active"] = 1
    again = run(body, d.status, later, jobs=[running])
    assert again.actions == []  # no second deadline stop while exporting
    done = run(body, d.status, later, jobs=[job("llama-cpt-export", complete=True)])
    assert done.status["phase"] == "Failed" and done.status["outputUri"]
    failed = condition(done.status, "Failed")
    assert failed["reason"] == cond.DEADLINE_EXCEEDED and "step 33 is exported" in failed["message"]
    assert condition(done.status, "Exported")["status"] == "True"


def test_export_on_deadline_set_after_the_run_failed_starts_the_export_once() -> None:
    body = body_of("trn1-nxd", resiliency={"activeDeadlineSeconds": 3600})
    status = deadline_stop(body).status
    assert status["phase"] == "Failed"
    later = T0 + timedelta(hours=5)
    assert run(body, status, later).actions == []  # sticky without the request
    body["spec"]["resiliency"]["exportOnDeadline"] = True
    d = run(body, status, later)
    assert d.status["phase"] == "Converting" and creates(d) == ["llama-cpt-export"]
    done = run(body, d.status, later, jobs=[job("llama-cpt-export", complete=True)])
    assert done.status["phase"] == "Failed" and done.status["outputUri"]
    assert (
        run(body, done.status, later, jobs=[job("llama-cpt-export", complete=True)]).actions == []
    )


# -- precompile (nxd) ----------------------------------------------------------------------------


def weights_done(body: dict[str, Any]) -> Any:
    status = status_in("PreparingWeights", body)
    return run(
        body,
        status,
        jobs=[job("llama-cpt-tokenize", complete=True), job("llama-cpt-weights", complete=True)],
    )


def test_precompile_runs_the_training_command_under_neuron_parallel_compile_on_the_gang() -> None:
    body = body_of("trn1-nxd", runtime__precompile=True, runtime__kueueQueueName=None)
    d = weights_done(body)
    assert d.status["phase"] == "Precompiling" and creates(d) == ["llama-cpt-precompile"]
    (action,) = [a for a in d.actions if isinstance(a, CreateChild)]
    master = action.manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert action.manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1  # the gang
    container = master["containers"][0]
    assert container["command"] == ["cpt-train", "precompile"] and container["args"] == []
    env = {e["name"]: e.get("value") for e in container["env"]}
    cfg = json.loads(env["CPT_STAGE_CONFIG"])
    assert cfg["stage"] == "precompile" and cfg["train"]["backend"] == "nxd"
    assert cfg["command"][0] == "cpt-torchrun" and cfg["command"][-1] == "train"
    assert cfg["markerUri"].endswith(f"cpt-precompiled/{cfg['cacheKey']}.json")
    assert "NEURON_COMPILE_CACHE_URL" in env  # the training pods' Neuron env
    done = run(body, d.status, pytorchjobs=[ptj("llama-cpt-precompile", condition="Succeeded")])
    assert done.status["phase"] == "Training" and creates(done) == ["llama-cpt-train-1"]
    assert condition(done.status, "Precompiled")["reason"] == "Compiled"


def test_precompile_is_skipped_when_the_cache_records_the_key_and_fails_the_run_on_error() -> None:
    body = body_of("trn1-nxd", runtime__precompile=True, runtime__kueueQueueName=None)
    status = run(
        body, status_in("PreparingWeights", body), jobs=[job("llama-cpt-weights", complete=True)]
    ).status
    assert status["phase"] == "Precompiling"
    hit = run(body, {**status, "children": {}}, precompiled=True)
    assert hit.status["phase"] == "Training" and creates(hit) == ["llama-cpt-train-1"]
    assert condition(hit.status, "Precompiled")["reason"] == "CacheHit"
    failed = run(body, status, pytorchjobs=[ptj("llama-cpt-precompile", condition="Failed")])
    assert failed.status["phase"] == "Failed"
    assert condition(failed.status, "Failed")["reason"] == cond.PRECOMPILE_FAILED


def test_the_precompile_key_follows_the_layout_not_the_attempt_or_the_uris() -> None:
    from cpt_operator.api.models import ContinualPretrainSpec
    from cpt_operator.builders.precompile import precompile_stage

    def key(**changes: Any) -> str:
        spec = ContinualPretrainSpec.model_validate(body_of("trn1-nxd", **changes)["spec"])
        return precompile_stage(spec, "llama-cpt").cache_key

    base = key()
    assert key(checkpoints__s3Uri="s3://elsewhere/ckpt/") == base
    assert key(training__nodes=4) != base
    assert key(data__blockSize=8192) != base  # the sequence length: other graphs


def test_a_preflight_failing_on_a_nodes_devices_excludes_it_and_checks_again_once() -> None:
    body = body_of("trn1-nxd")
    status = run(body, None).status
    name = "llama-cpt-preflight"
    pods = [
        pod(
            f"{name}-master-0", name, phase="Failed", node="trn1-0", stage="preflight", attempt=None
        ),
        pod(
            f"{name}-worker-0", name, phase="Failed", node="trn1-1", stage="preflight", attempt=None
        ),
    ]
    d = run(
        body,
        status,
        pytorchjobs=[ptj(name, condition="Failed")],
        pods=pods,
        preflight=PREFLIGHT_RESULT,
    )
    assert d.status["phase"] == "Preflight" and ("PyTorchJob", name, None) in deletes(d)
    (excluded,) = d.status["excludedNodes"]
    assert excluded["node"] == "trn1-1" and excluded["reason"] == "PreflightFailed"
    assert excluded["attempt"] == 0 and ("Warning", "NodeExcluded") in events(d)
    assert condition(d.status, "PreflightPassed")["reason"] == "NodesExcluded"
    again = run(body, d.status)
    (action,) = [a for a in again.actions if isinstance(a, CreateChild)]
    terms = action.manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "affinity"
    ]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["trn1-1"]} in terms[0][
        "matchExpressions"
    ]
    # The same node failing again is not the node's fault: the run fails.
    second = run(
        body,
        again.status,
        pytorchjobs=[ptj(name, condition="Failed")],
        pods=pods,
        preflight=PREFLIGHT_RESULT,
    )
    assert second.status["phase"] == "Failed"
    assert condition(second.status, "Failed")["reason"] == cond.PREFLIGHT_FAILED
