"""The run's state machine as decision tables: given the spec, the status and what exists,
which status and which actions come out. Children are written as the API returns them (dicts),
so `observe` is exercised together with `decide`.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_operator.reconcile import conditions as cond
from cpt_operator.reconcile.actions import CreateChild, DeleteChild, EmitEvent
from cpt_operator.reconcile.decide import Decision, RunMeta, decide
from cpt_operator.reconcile.observe import Checkpoint, observe
from cpt_operator.reconcile.patch import merge_patch

pytestmark = pytest.mark.unit

SPECS = Path(__file__).resolve().parents[1] / "golden" / "specs"
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def body_of(name: str, **spec_changes: Any) -> dict[str, Any]:
    body = yaml.safe_load((SPECS / f"{name}.yaml").read_text())
    for dotted, value in spec_changes.items():
        node = body["spec"]
        *path, last = dotted.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return body


# -- raw objects as the API returns them -------------------------------------------------------


def job(
    name: str, *, complete: bool = False, failed: str = "", indexes: str = ""
) -> dict[str, Any]:
    conds = []
    if complete:
        conds.append({"type": "Complete", "status": "True"})
    if failed:
        conds.append({"type": "Failed", "status": "True", "reason": failed, "message": "boom"})
    status: dict[str, Any] = {"conditions": conds}
    if indexes:
        status["failedIndexes"] = indexes
    return {"metadata": {"name": name, "creationTimestamp": ts(T0)}, "status": status}


def ptj(
    name: str,
    attempt: int | None = None,
    *,
    condition: str = "Running",
    deleting: bool = False,
    message: str = "",
) -> dict[str, Any]:
    labels = {"cpt.dev/run": "llama-cpt"}
    if attempt is not None:
        labels["cpt.dev/attempt"] = str(attempt)
    meta: dict[str, Any] = {"name": name, "labels": labels, "creationTimestamp": ts(T0)}
    if deleting:
        meta["deletionTimestamp"] = ts(T0)
    return {
        "metadata": meta,
        "status": {
            "conditions": [
                {"type": "Created", "status": "True", "lastTransitionTime": ts(T0)},
                {
                    "type": condition,
                    "status": "True",
                    "reason": f"PyTorchJob{condition}",
                    "message": message,
                    "lastTransitionTime": ts(T0 + timedelta(seconds=1)),
                },
            ]
        },
    }


def pod(
    name: str,
    owner: str,
    *,
    phase: str = "Running",
    node: str = "trn1-0",
    stage: str = "train",
    attempt: int | None = 1,
    created: datetime = T0,
    exit_code: int | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    labels = {"cpt.dev/run": "llama-cpt", "cpt.dev/stage": stage}
    if attempt is not None:
        labels["cpt.dev/attempt"] = str(attempt)
    meta: dict[str, Any] = {
        "name": name,
        "labels": labels,
        "creationTimestamp": ts(created),
        "ownerReferences": [{"kind": "PyTorchJob", "name": owner, "controller": True}],
    }
    if deleting:
        meta["deletionTimestamp"] = ts(created)
    status: dict[str, Any] = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [
            {"name": "pytorch", "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}
        ]
    if phase == "Pending":
        status["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/8 nodes are available",
            }
        ]
    return {
        "metadata": meta,
        "spec": {"nodeName": node if phase != "Pending" else ""},
        "status": status,
    }


def node(name: str, *, ready: bool = True, since: datetime = T0) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "Unknown",
                    "reason": "KubeletReady" if ready else "NodeStatusUnknown",
                    "lastTransitionTime": ts(since),
                }
            ]
        },
    }


def gang(attempt: int = 1, **pod_kw: Any) -> list[dict[str, Any]]:
    name = f"llama-cpt-train-{attempt}"
    return [
        pod(f"{name}-master-0", name, attempt=attempt, node="trn1-0", **pod_kw),
        pod(f"{name}-worker-0", name, attempt=attempt, node="trn1-1", **pod_kw),
    ]


def run(
    body: dict[str, Any], status: dict[str, Any] | None, now: datetime = T0, **observed: Any
) -> Decision:
    return decide(RunMeta.of(body), body["spec"], status, observe(**observed), now)


def creates(d: Decision) -> list[str]:
    return [a.name for a in d.actions if isinstance(a, CreateChild)]


def deletes(d: Decision) -> list[tuple[str, str, int | None]]:
    return [(a.kind, a.name, a.grace_period) for a in d.actions if isinstance(a, DeleteChild)]


def events(d: Decision) -> list[tuple[str, str]]:
    return [(a.type, a.reason) for a in d.actions if isinstance(a, EmitEvent)]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def status_in(phase: str, body: dict[str, Any], **observed: Any) -> dict[str, Any]:
    """Drive a fresh run to `phase` through the real transitions."""
    status: dict[str, Any] | None = None
    seen: dict[str, list[dict[str, Any]]] = {"jobs": [], "pytorchjobs": []}
    name = body["metadata"]["name"]
    for _ in range(10):
        d = run(body, status, **seen)
        status = d.status
        if status["phase"] == phase:
            return status
        current = status["phase"]
        if current == "Preflight":
            seen["pytorchjobs"] = [ptj(f"{name}-preflight", condition="Succeeded")]
        elif current in ("Tokenizing", "PreparingWeights", "Converting"):
            comp = {
                "Tokenizing": "tokenize",
                "PreparingWeights": "weights",
                "Converting": "export",
            }[current]
            seen["jobs"] = [*seen["jobs"], job(f"{name}-{comp}", complete=True)]
        elif current == "Training":
            seen["pytorchjobs"] = [ptj(f"{name}-train-1", 1, condition="Succeeded")]
    raise AssertionError(f"never reached {phase}: {status}")


# -- the happy path ----------------------------------------------------------------------------


def test_a_new_run_is_planned_and_starts_the_preflight_check_in_one_reconcile() -> None:
    body = body_of("trn1-nxd")
    d = run(body, None)
    assert d.status["phase"] == "Preflight"
    assert creates(d) == ["llama-cpt-preflight"]
    assert events(d) == [("Normal", "StartedPlanning"), ("Normal", "StartedPreflight")]
    assert d.status["plan"]["tensorParallel"] == 8 and d.status["plan"]["dataParallel"] == 2
    assert condition(d.status, "Planned")["status"] == "True"
    assert d.status["observedGeneration"] == 1
    assert d.status["tensorboardUri"] == "s3://cpt-ckpt/llama-cpt/tensorboard/"
    assert d.changed


def test_without_preflight_a_run_goes_straight_to_tokenizing() -> None:
    body = body_of("p5-native")
    d = run(body, None)
    assert d.status["phase"] == "Tokenizing"
    assert creates(d) == ["llama-gpu-tokenize"]
    assert condition(d.status, "DataReady")["reason"] == "InProgress"


def test_a_passed_preflight_starts_tokenization() -> None:
    body = body_of("trn1-nxd")
    status = run(body, None).status
    d = run(body, status, pytorchjobs=[ptj("llama-cpt-preflight", condition="Succeeded")])
    assert d.status["phase"] == "Tokenizing" and creates(d) == ["llama-cpt-tokenize"]
    assert condition(d.status, "PreflightPassed")["status"] == "True"


def test_a_failed_preflight_fails_the_run_with_its_reason() -> None:
    body = body_of("trn1-nxd")
    status = run(body, None).status
    d = run(
        body,
        status,
        pytorchjobs=[
            ptj("llama-cpt-preflight", condition="Failed", message="bus bandwidth 3 GB/s < 50")
        ],
    )
    assert d.status["phase"] == "Failed"
    assert condition(d.status, "Failed")["reason"] == cond.PREFLIGHT_FAILED
    assert "bus bandwidth" in condition(d.status, "Failed")["message"]
    assert ("Warning", "Failed") in events(d)


def test_finished_tokenization_leads_nxd_runs_to_weight_conversion() -> None:
    body = body_of("trn1-nxd")
    status = status_in("Tokenizing", body)
    d = run(body, status, jobs=[job("llama-cpt-tokenize", complete=True)])
    assert d.status["phase"] == "PreparingWeights" and creates(d) == ["llama-cpt-weights"]
    assert condition(d.status, "DataReady")["status"] == "True"


def test_finished_tokenization_leads_native_runs_straight_to_training_attempt_1() -> None:
    body = body_of("p5-native")
    status = status_in("Tokenizing", body)
    d = run(body, status, jobs=[job("llama-gpu-tokenize", complete=True)])
    assert d.status["phase"] == "Training" and creates(d) == ["llama-gpu-train-1"]
    assert d.status["attempt"] == 1 and d.status["children"]["train"] == "llama-gpu-train-1"
    assert ("Normal", "AttemptStarted") in events(d)


def test_a_tokenization_job_out_of_retries_fails_the_run_naming_the_shards() -> None:
    body = body_of("trn1-nxd")
    status = status_in("Tokenizing", body)
    d = run(body, status, jobs=[job("llama-cpt-tokenize", failed="FailedIndexes", indexes="1,3")])
    assert d.status["phase"] == "Failed"
    failed = condition(d.status, "Failed")
    assert failed["reason"] == cond.TOKENIZATION_FAILED and "1,3" in failed["message"]
    assert creates(d) == []


def tool_pod(
    name: str, job_name: str, *, waiting: str = "", scheduled: bool = True
) -> dict[str, Any]:
    """A Job's pod that never started: unschedulable, or scheduled with a container that
    cannot be created (`waiting` reason)."""
    body = pod(name, job_name, phase="Pending", stage="tokenize", attempt=None)
    body["metadata"]["ownerReferences"] = [{"kind": "Job", "name": job_name, "controller": True}]
    if scheduled:
        body["spec"]["nodeName"] = "cpu-0"
        body["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
    if waiting:
        body["status"]["containerStatuses"] = [
            {
                "name": "tokenize",
                "state": {"waiting": {"reason": waiting, "message": 'secret "hf" not found'}},
            }
        ]
    return body


@pytest.mark.parametrize(
    ("pods", "expect"),
    [
        (
            [tool_pod("llama-cpt-tokenize-0-x", "llama-cpt-tokenize", scheduled=False)],
            "Pending for more than 300s: Unschedulable: 0/8 nodes are available",
        ),
        (
            [
                tool_pod(
                    "llama-cpt-tokenize-0-x",
                    "llama-cpt-tokenize",
                    waiting="CreateContainerConfigError",
                )
            ],
            'Pending for more than 300s: CreateContainerConfigError: secret "hf" not found',
        ),
        ([], "has no pods after 300s: the Job controller could not create them"),
    ],
    ids=["unschedulable", "container-cannot-be-created", "no-pods-at-all"],
)
def test_a_tool_job_that_never_starts_fails_the_run_after_the_pending_timeout(
    pods: list[dict[str, Any]], expect: str
) -> None:
    body = body_of("trn1-nxd", resiliency={"pendingTimeoutSeconds": 300})
    status = status_in("Tokenizing", body)
    seen = {"jobs": [job("llama-cpt-tokenize")], "pods": pods}
    early = run(body, status, T0 + timedelta(seconds=299), **seen)
    assert early.status["phase"] == "Tokenizing" and early.actions == []
    d = run(body, status, T0 + timedelta(seconds=301), **seen)
    assert d.status["phase"] == "Failed"
    failed = condition(d.status, "Failed")
    assert failed["reason"] == cond.TOKENIZATION_FAILED
    assert expect in failed["message"] and "llama-cpt-tokenize" in failed["message"]
    assert condition(d.status, "DataReady")["reason"] == cond.PENDING_TIMEOUT
    assert deletes(d) == [("Job", "llama-cpt-tokenize", None)] and creates(d) == []
    assert ("Warning", "Failed") in events(d)


def test_a_tool_job_with_running_pods_or_no_timeout_is_left_alone() -> None:
    body = body_of("trn1-nxd", resiliency={"pendingTimeoutSeconds": 300})
    status = status_in("Tokenizing", body)
    running = pod("llama-cpt-tokenize-0-x", "llama-cpt-tokenize", stage="tokenize", node="cpu-0")
    running["metadata"]["ownerReferences"][0]["kind"] = "Job"
    later = T0 + timedelta(hours=5)
    d = run(body, status, later, jobs=[job("llama-cpt-tokenize")], pods=[running])
    assert d.status["phase"] == "Tokenizing" and d.actions == []
    off = body_of("trn1-nxd", resiliency={"pendingTimeoutSeconds": 0})
    status = status_in("Tokenizing", off)
    d = run(off, status, later, jobs=[job("llama-cpt-tokenize")])
    assert d.status["phase"] == "Tokenizing" and d.actions == []


def test_converted_weights_start_training_attempt_1_from_the_base_model() -> None:
    body = body_of("trn1-nxd")
    status = status_in("PreparingWeights", body)
    d = run(
        body,
        status,
        jobs=[job("llama-cpt-tokenize", complete=True), job("llama-cpt-weights", complete=True)],
    )
    assert d.status["phase"] == "Training" and creates(d) == ["llama-cpt-train-1"]
    assert "resumeFrom" not in d.status
    assert d.status["attempts"][0]["attempt"] == 1
    assert d.status["attempts"][0]["startTime"] == ts(T0)


def test_a_succeeded_training_job_is_exported_and_the_export_finishes_the_run() -> None:
    body = body_of("trn1-nxd")
    status = status_in("Training", body)
    d = run(body, status, pytorchjobs=[ptj("llama-cpt-train-1", 1, condition="Succeeded")])
    assert d.status["phase"] == "Converting" and creates(d) == ["llama-cpt-export"]
    d2 = run(
        body,
        d.status,
        jobs=[job("llama-cpt-export", complete=True)],
        pytorchjobs=[ptj("llama-cpt-train-1", 1, condition="Succeeded")],
    )
    assert d2.status["phase"] == "Succeeded"
    assert d2.status["outputUri"] == "s3://cpt-out/llama-cpt/"
    assert condition(d2.status, "Succeeded")["status"] == "True"
    assert condition(d2.status, "Exported")["status"] == "True"


def test_terminal_phases_are_sticky_whatever_the_children_do() -> None:
    body = body_of("trn1-nxd")
    done = status_in("Succeeded", body)
    d = run(
        body,
        done,
        pytorchjobs=[ptj("llama-cpt-train-1", 1, condition="Failed")],
        pods=gang(1, phase="Failed", exit_code=1),
    )
    assert d.actions == [] and not d.changed and d.status["phase"] == "Succeeded"


def test_a_failed_export_fails_the_run() -> None:
    body = body_of("trn1-nxd")
    status = status_in("Converting", body)
    d = run(body, status, jobs=[job("llama-cpt-export", failed="BackoffLimitExceeded")])
    assert d.status["phase"] == "Failed"
    assert condition(d.status, "Failed")["reason"] == cond.EXPORT_FAILED


# -- invalid specs -----------------------------------------------------------------------------


def test_a_spec_the_models_reject_fails_with_a_condition_an_event_and_no_children() -> None:
    body = body_of("trn1-nxd")
    del body["spec"]["output"]
    d = run(body, None)
    assert d.status["phase"] == "Failed" and creates(d) == []
    failed = condition(d.status, "Failed")
    assert failed["reason"] == cond.INVALID_SPEC and "spec.output" in failed["message"]
    assert condition(d.status, "Planned")["status"] == "False"
    assert events(d) == [("Warning", "Failed")]


def test_a_spec_the_planner_rejects_names_the_field_and_creates_nothing() -> None:
    body = body_of("trn1-nxd", training__tensorParallel=32, training__pipelineParallel=1)
    d = run(body, None)
    assert d.status["phase"] == "Failed" and creates(d) == []
    failed = condition(d.status, "Failed")
    assert failed["reason"] == cond.INVALID_SPEC
    assert "spec.training.tensorParallel" in failed["message"]
    assert ("Warning", "Failed") in events(d)


# -- training, progress and recovery -----------------------------------------------------------


def training_status(body: dict[str, Any]) -> dict[str, Any]:
    status = status_in("Training", body)
    assert status["attempt"] == 1
    return status


def test_progress_json_becomes_status_progress_with_eta_and_the_newest_checkpoint() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    prog = {
        "attempt": 1,
        "step": 40,
        "maxSteps": 100,
        "loss": 2.345678,
        "tokensPerSec": 131072.0,
        "mfu": 0.2512,
        "lr": 1e-4,
        "updatedAt": ts(T0),
        "lastCommittedStep": 40,
    }
    d = run(
        body,
        status,
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1")],
        progress=prog,
        checkpoint=Checkpoint(40, "s3://cpt-ckpt/llama-cpt/step_40"),
    )
    p = d.status["progress"]
    assert p["stepOfMax"] == "40/100" and p["loss"] == 2.3457 and p["mfuPercent"] == 25.12
    # 60 steps x 131072 tokens at 131072 tokens/s = 60 s after updatedAt.
    assert p["eta"] == ts(T0 + timedelta(seconds=60))
    assert d.status["checkpoint"] == {"step": 40, "uri": "s3://cpt-ckpt/llama-cpt/step_40"}
    assert d.actions == []


def test_a_reconcile_with_nothing_new_changes_nothing_and_acts_on_nothing() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    seen = dict(
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    first = run(body, status, **seen)
    again = run(body, first.status, T0 + timedelta(seconds=10), **seen)
    assert again.actions == [] and not again.changed
    assert merge_patch(first.status, again.status) == {}


def test_a_failed_worker_pod_ends_the_attempt_and_schedules_attempt_2() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    pods = gang(1)
    pods[1] = pod(
        "llama-cpt-train-1-worker-0",
        "llama-cpt-train-1",
        phase="Failed",
        node="trn1-1",
        exit_code=137,
    )
    d = run(
        body,
        status,
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=pods,
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    assert d.status["phase"] == "Training" and d.status["attempt"] == 2
    assert ("PyTorchJob", "llama-cpt-train-1", None) in deletes(d)
    assert creates(d) == []  # not while attempt 1 still has pods
    assert events(d) == [("Warning", "AttemptFailed"), ("Normal", "Restarting")]
    first = d.status["attempts"][0]
    assert first["reason"] == cond.POD_FAILED and "exit code 137" in first["message"]
    assert condition(d.status, "Training")["reason"] == cond.POD_FAILED


def test_attempt_2_starts_once_attempt_1_is_gone_and_records_the_checkpoint_it_resumes() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    failing = run(
        body,
        status,
        pytorchjobs=[ptj("llama-cpt-train-1", 1, condition="Failed")],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    assert failing.status["attempt"] == 2
    waiting = run(
        body,
        failing.status,
        pytorchjobs=[ptj("llama-cpt-train-1", 1, deleting=True)],
        pods=gang(1, deleting=True),
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    assert creates(waiting) == [] and "waiting" in waiting.status["message"]
    ckpt = Checkpoint(40, "s3://cpt-ckpt/llama-cpt/step_40")
    d = run(body, waiting.status, checkpoint=ckpt)
    assert creates(d) == ["llama-cpt-train-2"]
    assert d.status["resumeFrom"] == {"step": 40, "uri": ckpt.uri}
    assert d.status["attempts"][1]["resumeFromStep"] == 40
    (action,) = [a for a in d.actions if isinstance(a, CreateChild)]
    assert action.manifest["metadata"]["annotations"]["cpt.dev/expected-resume-step"] == "40"
    assert "resuming from step 40" in d.status["message"]


def test_the_last_attempt_failing_fails_the_run_and_says_why() -> None:
    body = body_of("trn1-nxd", resiliency={"maxAttempts": 1})
    status = training_status(body)
    d = run(
        body,
        status,
        pytorchjobs=[ptj("llama-cpt-train-1", 1, condition="Failed", message="worker exited 1")],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    assert d.status["phase"] == "Failed" and d.status["attempt"] == 1
    failed = condition(d.status, "Failed")
    assert failed["reason"] == cond.MAX_ATTEMPTS_EXCEEDED
    assert cond.JOB_FAILED in failed["message"] and "worker exited 1" in failed["message"]
    assert ("PyTorchJob", "llama-cpt-train-1", None) in deletes(d)
    assert creates(d) == []


def test_a_restarting_pytorchjob_is_a_failed_attempt_too() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    d = run(
        body,
        status,
        pytorchjobs=[ptj("llama-cpt-train-1", 1, condition="Restarting")],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    assert d.status["attempts"][0]["reason"] == cond.JOB_RESTARTING and d.status["attempt"] == 2


def test_a_node_not_ready_within_the_grace_period_is_tolerated() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    now = T0 + timedelta(seconds=30)
    d = run(
        body,
        status,
        now,
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1", ready=False, since=T0)],
    )
    assert d.actions == [] and d.status["attempt"] == 1


def test_a_node_not_ready_past_the_grace_period_restarts_and_force_deletes_its_pod() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    now = T0 + timedelta(seconds=61)
    d = run(
        body,
        status,
        now,
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1", ready=False, since=T0)],
    )
    assert d.status["attempt"] == 2
    assert d.status["attempts"][0]["reason"] == cond.NODE_NOT_READY
    assert ("Pod", "llama-cpt-train-1-worker-0", 0) in deletes(d)
    assert ("Pod", "llama-cpt-train-1-master-0", 0) not in deletes(d)


def test_a_pod_stuck_on_a_dead_node_is_force_deleted_before_the_next_attempt() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    failing = run(
        body,
        status,
        pytorchjobs=[ptj("llama-cpt-train-1", 1, condition="Failed")],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    stuck = [pod("llama-cpt-train-1-worker-0", "llama-cpt-train-1", node="trn1-1", deleting=True)]
    d = run(body, failing.status, pods=stuck, nodes=[node("trn1-1", ready=False)])
    assert deletes(d) == [("Pod", "llama-cpt-train-1-worker-0", 0)] and creates(d) == []


def test_a_pod_pending_past_the_pending_timeout_restarts_the_attempt() -> None:
    body = body_of("trn1-nxd", resiliency={"pendingTimeoutSeconds": 300})
    status = training_status(body)
    pods = gang(1, phase="Pending")
    d = run(
        body,
        status,
        T0 + timedelta(seconds=301),
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=pods,
    )
    assert d.status["attempts"][0]["reason"] == cond.PENDING_TIMEOUT
    assert "0/8 nodes are available" in d.status["attempts"][0]["message"]


def test_no_step_progress_past_the_hang_timeout_restarts_the_attempt() -> None:
    body = body_of("trn1-nxd", resiliency={"hangTimeoutSeconds": 600})
    status = training_status(body)
    seen = dict(
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    status = run(body, status, T0, **seen).status  # all pods Running: the hang clock starts
    assert status["attempts"][0]["runningSince"] == ts(T0)
    prog = {"attempt": 1, "step": 5, "updatedAt": ts(T0)}
    status = run(body, status, T0 + timedelta(seconds=500), progress=prog, **seen).status
    assert status["attempts"][0]["lastStep"] == 5
    still = run(body, status, T0 + timedelta(seconds=1000), progress=prog, **seen)
    assert still.status["attempt"] == 1  # 500 s since step 5 was first seen
    hung = run(body, still.status, T0 + timedelta(seconds=1101), progress=prog, **seen)
    assert hung.status["attempt"] == 2
    assert hung.status["attempts"][0]["reason"] == cond.HANG
    assert "still at step 5" in hung.status["attempts"][0]["message"]


def test_an_unreadable_s3_never_counts_as_a_hang() -> None:
    body = body_of("trn1-nxd", resiliency={"hangTimeoutSeconds": 600})
    status = training_status(body)
    seen = dict(
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    status = run(body, status, T0, **seen).status
    d = run(body, status, T0 + timedelta(hours=2), storage_error="EndpointConnectionError", **seen)
    assert d.status["attempt"] == 1 and d.actions == []


def test_a_training_job_deleted_behind_the_operators_back_is_a_failed_attempt() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    d = run(body, status)
    assert d.status["attempt"] == 2
    assert d.status["attempts"][0]["reason"] == cond.JOB_DELETED


def test_a_child_created_just_before_a_crash_is_adopted_not_duplicated() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    lost = copy.deepcopy(status)
    lost["children"].pop("train")  # the status patch never happened
    d = run(
        body,
        lost,
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    assert creates(d) == [] and d.status["children"]["train"] == "llama-cpt-train-1"
    assert d.status["attempt"] == 1


def test_an_attempt_counter_bumped_before_a_crash_still_tears_the_old_attempt_down() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    bumped = run(
        body,
        status,
        pytorchjobs=[ptj("llama-cpt-train-1", 1, condition="Failed")],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1")],
    ).status
    # The delete was lost: attempt 1's job is still there, not being deleted.
    d = run(
        body,
        bumped,
        pytorchjobs=[ptj("llama-cpt-train-1", 1, condition="Failed")],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    assert ("PyTorchJob", "llama-cpt-train-1", None) in deletes(d) and creates(d) == []
    assert d.status["attempt"] == 2


# -- failed nodes are kept out of later attempts ----------------------------------------------

UNHEALTHY = (
    "Pod was rejected: Allocate failed due to no healthy devices present; cannot allocate "
    "unhealthy devices aws.amazon.com/neuron, which is unexpected"
)


def not_ready_end(body: dict[str, Any], status: dict[str, Any], attempt: int = 1) -> Decision:
    """Attempt `attempt` (master on trn1-0, worker on trn1-1) loses trn1-1 past the grace."""
    return run(
        body,
        status,
        T0 + timedelta(seconds=61),
        pytorchjobs=[ptj(f"llama-cpt-train-{attempt}", attempt)],
        pods=gang(attempt),
        nodes=[node("trn1-0"), node("trn1-1", ready=False, since=T0)],
    )


def start_next(body: dict[str, Any], status: dict[str, Any]) -> Decision:
    """The previous attempt is gone: the next one is created."""
    d = run(body, status, T0 + timedelta(seconds=70), checkpoint=Checkpoint(20, "s3://c/step_20"))
    assert len(creates(d)) == 1, d.actions
    return d


def required_terms(d: Decision) -> list[list[dict[str, Any]]]:
    """Each replica's required node selector terms in the created PyTorchJob."""
    (action,) = [a for a in d.actions if isinstance(a, CreateChild)]
    out = []
    for replica in action.manifest["spec"]["pytorchReplicaSpecs"].values():
        aff = replica["template"]["spec"].get("affinity") or {}
        req = (aff.get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
        out.append((req or {}).get("nodeSelectorTerms", []))
    return out


def event_messages(d: Decision, reason: str) -> list[str]:
    return [a.message for a in d.actions if isinstance(a, EmitEvent) and a.reason == reason]


def test_a_node_not_ready_past_the_grace_is_recorded_and_attempt_2_avoids_it() -> None:
    body = body_of("trn1-nxd")
    d = not_ready_end(body, training_status(body))
    assert d.status["excludedNodes"] == [
        {
            "node": "trn1-1",
            "reason": cond.EXCLUDED_NOT_READY,
            "attempt": 1,
            "since": ts(T0 + timedelta(seconds=61)),
        }
    ]
    assert ("Warning", cond.NODE_EXCLUDED) in events(d)
    (msg,) = event_messages(d, cond.NODE_EXCLUDED)
    assert (
        "node trn1-1" in msg and "NodeNotReady in attempt 1" in msg and "NodeStatusUnknown" in msg
    )
    started = start_next(body, d.status)
    not_in = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["trn1-1"]}
    assert required_terms(started) == [[{"matchExpressions": [not_in]}]] * 2
    (msg,) = event_messages(started, "AttemptStarted")
    assert "avoiding node(s) trn1-1" in msg
    # Ready again (the NotReady taint is gone): still excluded, and a later failure adds to it.
    again = run(
        body,
        started.status,
        T0 + timedelta(seconds=80),
        pytorchjobs=[ptj("llama-cpt-train-2", 2)],
        pods=[
            pod("llama-cpt-train-2-master-0", "llama-cpt-train-2", attempt=2, node="trn1-2"),
            pod("llama-cpt-train-2-worker-0", "llama-cpt-train-2", attempt=2, node="trn1-3"),
        ],
        nodes=[node("trn1-1"), node("trn1-2")],  # trn1-3 was deleted (the node group replaced it)
    )
    assert d.status["attempts"][0]["reason"] == cond.NODE_NOT_READY
    assert again.status["attempts"][1]["reason"] == cond.NODE_NOT_READY
    assert [(e["node"], e["reason"], e["attempt"]) for e in again.status["excludedNodes"]] == [
        ("trn1-1", cond.EXCLUDED_NOT_READY, 1),
        ("trn1-3", cond.EXCLUDED_GONE, 2),
    ]
    third = start_next(body, again.status)
    for (term,) in required_terms(third):
        assert term["matchExpressions"][0]["values"] == ["trn1-1", "trn1-3"]


def test_a_pod_the_kubelet_refuses_for_unhealthy_devices_excludes_its_node() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    pods = gang(1)
    refused = pod("llama-cpt-train-1-worker-0", "llama-cpt-train-1", phase="Failed", node="trn1-1")
    refused["status"].update(reason="UnexpectedAdmissionError", message=UNHEALTHY)
    pods[1] = refused
    d = run(
        body,
        status,
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=pods,
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    assert d.status["attempts"][0]["reason"] == cond.POD_FAILED
    ((name, reason),) = [(e["node"], e["reason"]) for e in d.status["excludedNodes"]]
    assert (name, reason) == ("trn1-1", cond.EXCLUDED_DEVICE_UNHEALTHY)
    (msg,) = event_messages(d, cond.NODE_EXCLUDED)
    assert "aws.amazon.com/neuron" in msg


def test_an_ordinary_pod_failure_or_a_short_not_ready_excludes_no_node() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    pods = gang(1)
    pods[1] = pod(
        "llama-cpt-train-1-worker-0",
        "llama-cpt-train-1",
        phase="Failed",
        node="trn1-1",
        exit_code=137,
    )
    d = run(
        body,
        status,
        T0 + timedelta(seconds=30),
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=pods,
        # trn1-0 is NotReady, but only for 30 of the 60 s grace.
        nodes=[node("trn1-0", ready=False, since=T0), node("trn1-1")],
    )
    assert d.status["attempt"] == 2 and d.status["excludedNodes"] == []
    assert cond.NODE_EXCLUDED not in [r for _, r in events(d)]
    assert required_terms(start_next(body, d.status)) == [[], []]


def test_with_exclusion_switched_off_no_node_is_recorded_or_avoided() -> None:
    body = body_of("trn1-nxd", resiliency__excludeFailedNodes=False)
    d = not_ready_end(body, training_status(body))
    assert d.status["attempts"][0]["reason"] == cond.NODE_NOT_READY
    assert d.status["excludedNodes"] == [] and cond.NODE_EXCLUDED not in [r for _, r in events(d)]
    assert required_terms(start_next(body, d.status)) == [[], []]


def test_past_max_excluded_nodes_the_oldest_exclusion_drops_out_with_an_event() -> None:
    body = body_of("trn1-nxd", resiliency__maxExcludedNodes=1)
    first = not_ready_end(body, training_status(body))
    status = start_next(body, first.status).status
    pods = [
        pod("llama-cpt-train-2-master-0", "llama-cpt-train-2", attempt=2, node="trn1-2"),
        pod("llama-cpt-train-2-worker-0", "llama-cpt-train-2", attempt=2, node="trn1-3"),
    ]
    d = run(
        body,
        status,
        T0 + timedelta(seconds=200),
        pytorchjobs=[ptj("llama-cpt-train-2", 2)],
        pods=pods,
        nodes=[node("trn1-2"), node("trn1-3", ready=False, since=T0 + timedelta(seconds=100))],
    )
    assert [e["node"] for e in d.status["excludedNodes"]] == ["trn1-3"]
    (dropped,) = event_messages(d, cond.NODE_EXCLUSION_DROPPED)
    assert "node trn1-1" in dropped and "at most 1 nodes" in dropped
    assert "spec.resiliency.maxExcludedNodes" in dropped
    for (term,) in required_terms(start_next(body, d.status)):
        assert term["matchExpressions"][0]["values"] == ["trn1-3"]


def test_a_pending_timeout_names_the_nodes_this_run_excludes() -> None:
    body = body_of("trn1-nxd", resiliency__pendingTimeoutSeconds=300)
    started = start_next(body, not_ready_end(body, training_status(body)).status)
    pending = [
        pod("llama-cpt-train-2-master-0", "llama-cpt-train-2", attempt=2, phase="Pending"),
        pod("llama-cpt-train-2-worker-0", "llama-cpt-train-2", attempt=2, phase="Pending"),
    ]
    d = run(
        body,
        started.status,
        T0 + timedelta(seconds=301),
        pytorchjobs=[ptj("llama-cpt-train-2", 2)],
        pods=pending,
    )
    second = d.status["attempts"][1]
    assert second["reason"] == cond.PENDING_TIMEOUT
    assert "0/8 nodes are available" in second["message"]
    assert "1 node is excluded by this run" in second["message"]
    assert "trn1-1 (NodeNotReady in attempt 1)" in second["message"]
    assert "status.excludedNodes" in second["message"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "spec.resiliency.maxExcludedNodes: Input should be greater than or equal to 1"),
        (257, "spec.resiliency.maxExcludedNodes: Input should be less than or equal to 256"),
        (
            "many",
            'spec.resiliency.maxExcludedNodes: must be of type integer, got "many" (the API '
            "server converts no types)",
        ),
    ],
)
def test_an_out_of_range_max_excluded_nodes_is_refused_naming_the_field(
    value: Any, expected: str
) -> None:
    d = run(body_of("trn1-nxd", resiliency__maxExcludedNodes=value), None)
    assert d.status["phase"] == "Failed" and creates(d) == []
    assert expected in condition(d.status, "Failed")["message"]


# -- suspend and resume ------------------------------------------------------------------------


def test_suspending_a_training_run_deletes_the_attempt_and_keeps_the_state() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    body["spec"]["suspend"] = True
    d = run(
        body,
        status,
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=gang(1),
        jobs=[job("llama-cpt-tokenize", complete=True)],
        nodes=[node("trn1-0"), node("trn1-1")],
    )
    assert d.status["phase"] == "Suspended" and d.status["suspendedPhase"] == "Training"
    assert deletes(d) == [("PyTorchJob", "llama-cpt-train-1", None)]
    assert d.status["attempt"] == 1 and condition(d.status, "Suspended")["status"] == "True"
    while_gone = run(body, d.status)
    assert while_gone.actions == [] and not while_gone.changed


def test_resuming_continues_the_same_attempt_once_its_pods_are_gone() -> None:
    body = body_of("trn1-nxd")
    status = training_status(body)
    body["spec"]["suspend"] = True
    suspended = run(body, status, pytorchjobs=[ptj("llama-cpt-train-1", 1)]).status
    body["spec"]["suspend"] = False
    waiting = run(
        body, suspended, pods=gang(1, deleting=True), nodes=[node("trn1-0"), node("trn1-1")]
    )
    assert waiting.status["phase"] == "Training" and creates(waiting) == []
    d = run(body, waiting.status, checkpoint=Checkpoint(20, "s3://cpt-ckpt/llama-cpt/step_20"))
    assert creates(d) == ["llama-cpt-train-1"] and d.status["attempt"] == 1
    assert d.status["resumeFrom"]["step"] == 20
    assert condition(d.status, "Suspended")["status"] == "False"


def test_suspending_during_tokenization_deletes_the_job_and_resuming_recreates_it() -> None:
    body = body_of("trn1-nxd")
    status = status_in("Tokenizing", body)
    body["spec"]["suspend"] = True
    d = run(body, status, jobs=[job("llama-cpt-tokenize")])
    assert d.status["phase"] == "Suspended" and deletes(d) == [("Job", "llama-cpt-tokenize", None)]
    body["spec"]["suspend"] = False
    resumed = run(body, d.status)
    assert resumed.status["phase"] == "Tokenizing" and creates(resumed) == ["llama-cpt-tokenize"]


# -- conditions --------------------------------------------------------------------------------


def test_conditions_carry_the_generation_and_keep_their_transition_time_while_unchanged() -> None:
    body = body_of("trn1-nxd")
    first = run(body, None)
    body["metadata"]["generation"] = 2
    later = run(body, first.status, T0 + timedelta(minutes=5))
    planned = condition(later.status, "Planned")
    assert planned["lastTransitionTime"] == ts(T0)
    assert later.status["observedGeneration"] == 2


def test_merge_patch_nulls_removed_keys_and_diffs_nested_objects() -> None:
    old = {"phase": "Training", "children": {"train": "a", "tokenize": "t"}, "message": "x"}
    new = {"phase": "Training", "children": {"tokenize": "t"}, "attempt": 2}
    assert merge_patch(old, new) == {"children": {"train": None}, "message": None, "attempt": 2}


def test_a_failed_tool_job_condition_carries_the_stages_own_message() -> None:
    """The tokenize stage's termination message (a config error naming the field and the fix)
    reaches the run's Failed condition, not only the Job's generic reason."""
    body = body_of("trn1-nxd")
    status = status_in("Tokenizing", body)
    failed_pod = pod("llama-cpt-tokenize-0-abc", "llama-cpt-tokenize", phase="Failed", exit_code=2)
    failed_pod["metadata"]["ownerReferences"][0]["kind"] = "Job"
    said = "cpt-train tokenize: spec.data.sources[0].hfDataset 'wikicorpus' is a loading-script"
    failed_pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = said
    d = run(
        body,
        status,
        jobs=[job("llama-cpt-tokenize", failed="PodFailurePolicy")],
        pods=[failed_pod],
    )
    failed = condition(d.status, "Failed")
    assert failed["reason"] == cond.TOKENIZATION_FAILED
    assert said in failed["message"], failed["message"]
