"""The whole pipeline through the operator on the real control plane (KWOK nodes).

The operator runs as its own process (`python -m cpt_operator`); pods are placed by the real
scheduler onto fake trn1/cpu nodes. Job pods complete by themselves under KWOK; training pods
are driven with annotations, and `FakeTrainer` writes the progress.json and committed
checkpoints that the real trainer would (the real trainer runs in test_operator_real.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from e2e.harness import FakeTrainer, OperatorProcess, Runs, s3_keys, spec_body

from fixtures.cluster import wait_for
from fixtures.s3 import S3Server

pytestmark = pytest.mark.e2e

PHASES = [
    "Planning",
    "Preflight",
    "Tokenizing",
    "PreparingWeights",
    "Training",
    "Converting",
    "Succeeded",
]


def quick(name: str, bucket: str, **changes: Any) -> dict[str, Any]:
    """The seed shape without the preflight check (it has its own test above)."""
    changes.setdefault("resiliency", {})
    changes["resiliency"].setdefault("preflight", {"enabled": False})
    return spec_body(name, bucket, **changes)


def phase_events(runs: Runs, run: str) -> list[str]:
    """The phases the run went through, from its transition events ("A → B: ..."), followed
    from Pending (timestamps have one-second resolution, so they cannot order them)."""
    edges: dict[str, list[str]] = {}
    for e in runs.events(run):
        head = e["message"].split(":", 1)[0]
        if " → " in head:
            a, b = head.split(" → ", 1)
            edges.setdefault(a, []).append(b)
    path, here = [], "Pending"
    while edges.get(here):
        here = edges[here].pop(0)
        path.append(here)
    return path


def finish_gang(runs: Runs, run: str, child: str, *, count: int = 2) -> None:
    """Master succeeds: the training operator marks the PyTorchJob Succeeded."""
    selector = f"training.kubeflow.org/job-name={child},training.kubeflow.org/replica-type=master"

    def master() -> Any:
        pods = [p for p in runs.pods(selector) if p["status"].get("phase") == "Running"]
        return pods[0] if pods else None

    pod = wait_for(master, timeout=60, what=f"running master of {child}")
    runs.finish_pod(pod["metadata"]["name"])


def test_a_seed_shaped_trn1_run_goes_through_every_phase_and_shows_printer_columns(
    runs: Runs, bucket: str, s3_env: S3Server
) -> None:
    body = spec_body("seed", bucket, training__maxSteps=40)
    runs.create_s3_secret(s3_env)
    runs.create(body)

    runs.wait_phase("seed", "Preflight")
    finish_gang(runs, "seed", "seed-preflight")
    status = runs.wait_phase("seed", "Training", timeout=90)  # tokenize + weights auto-complete
    assert status["plan"]["tensorParallel"] == 8 and status["plan"]["pipelineParallel"] == 4
    assert status["attempt"] == 1 and status["children"]["train"] == "seed-train-1"

    pods = runs.training_pods("seed", 1, count=2)
    assert {p["spec"]["nodeName"] for p in pods} <= {f"trn1-{i}" for i in range(4)}
    assert len({p["spec"]["nodeName"] for p in pods}) == 2  # one whole trn1 node per replica

    trainer = FakeTrainer(body["spec"]["checkpoints"]["s3Uri"])
    trainer.commit(20)
    held_out = {"domain": 2.3456, "replay": 3.05}
    trainer.progress(attempt=1, step=25, max_steps=40, committed=20, held_out=held_out)
    status = runs.wait(
        "seed",
        lambda s: (s.get("progress") or {}).get("stepOfMax") == "25/40",
        timeout=30,
        what="progress 25/40 in status",
    )
    assert status["checkpoint"]["step"] == 20
    assert status["progress"]["mfuPercent"] == 31.0 and status["progress"]["eta"]
    assert status["eval"]["step"] == 25
    assert [(s["name"], s["loss"]) for s in status["eval"]["sources"]] == list(held_out.items())
    assert status["eval"]["summary"] == "domain=2.346,replay=3.050@25"

    table = runs.cluster.kubectl("get", "cpt", "-n", runs.ns).stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:7] == ["NAME", "PHASE", "STEP", "ATTEMPT", "LOSS", "TOKENS/S", "MFU%"]
    assert row.split()[:4] == ["seed", "Training", "25/40", "1"]
    wide = runs.cluster.kubectl("get", "cpt", "-n", runs.ns, "-o", "wide").stdout
    header, row = wide.splitlines()[:2]
    assert header.split()[8:11] == ["BACKEND", "NODES", "EVAL"]
    assert row.split()[8:11] == ["nxd", "2", "domain=2.346,replay=3.050@25"]

    trainer.commit(40)
    trainer.progress(attempt=1, step=40, max_steps=40, committed=40)
    finish_gang(runs, "seed", "seed-train-1")
    status = runs.wait_phase("seed", "Succeeded", timeout=90)
    assert status["outputUri"] == f"s3://{bucket}/models/seed/"
    assert status["checkpoint"]["step"] == 40
    assert phase_events(runs, "seed") == PHASES
    assert runs.child_names("seed") == [
        "seed-export",
        "seed-preflight",
        "seed-tokenize",
        "seed-train-1",
        "seed-weights",
    ]
    conds = {c["type"]: c for c in status["conditions"]}
    for t in ("Planned", "PreflightPassed", "DataReady", "WeightsReady", "Exported", "Succeeded"):
        assert conds[t]["status"] == "True", t
        assert conds[t]["observedGeneration"] == 1


def test_a_failed_worker_starts_attempt_2_resuming_from_the_reported_checkpoint(
    runs: Runs, bucket: str, s3_env: S3Server
) -> None:
    body = quick("retry", bucket, training__maxSteps=30)
    runs.create(body)
    runs.wait_phase("retry", "Training", timeout=90)
    pods = runs.training_pods("retry", 1, count=2)

    trainer = FakeTrainer(body["spec"]["checkpoints"]["s3Uri"])
    trainer.commit(10)
    trainer.progress(attempt=1, step=12, max_steps=30, committed=10)
    runs.wait(
        "retry",
        lambda s: (s.get("checkpoint") or {}).get("step") == 10,
        timeout=30,
        what="checkpoint step 10 in status",
    )
    worker = next(p for p in pods if "worker" in p["metadata"]["name"])
    runs.finish_pod(worker["metadata"]["name"], ok=False, exit_code=137)

    status = runs.wait(
        "retry",
        lambda s: s.get("attempt") == 2 and s.get("children", {}).get("train"),
        timeout=60,
        what="attempt 2 created",
    )
    assert status["resumeFrom"]["step"] == 10
    assert status["attempts"][0]["reason"] in ("PodFailed", "TrainingJobFailed")
    assert status["attempts"][1]["resumeFromStep"] == 10
    (ptj,) = [j for j in runs.pytorchjobs("retry") if j["metadata"]["name"] == "retry-train-2"]
    assert ptj["metadata"]["annotations"]["cpt.dev/expected-resume-step"] == "10"
    env = {
        e["name"]: e.get("value")
        for e in ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
            "env"
        ]
    }
    assert '"attempt":2' in env["CPT_STAGE_CONFIG"]
    wait_for(
        lambda: all(j["metadata"]["name"] != "retry-train-1" for j in runs.pytorchjobs("retry")),
        timeout=30,
        what="attempt 1 deleted",
    )
    assert "AttemptFailed" in runs.event_reasons("retry")

    runs.training_pods("retry", 2, count=2)
    trainer.progress(attempt=2, step=30, max_steps=30, committed=30)
    finish_gang(runs, "retry", "retry-train-2")
    runs.wait_phase("retry", "Succeeded", timeout=60)


def test_the_run_fails_after_max_attempts_saying_why(runs: Runs, bucket: str) -> None:
    body = quick("doomed", bucket, resiliency={"maxAttempts": 2})
    runs.create(body)
    for attempt in (1, 2):
        pods = runs.training_pods("doomed", attempt, count=2, timeout=90)
        runs.finish_pod(pods[0]["metadata"]["name"], ok=False, exit_code=3)
    status = runs.wait_phase("doomed", "Failed", timeout=60)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "MaxAttemptsExceeded"
    assert "all 2 training attempts failed" in failed["message"]
    assert status["attempt"] == 2 and len(status["attempts"]) == 2
    assert runs.event_reasons("doomed").count("AttemptFailed") == 2
    wait_for(lambda: not runs.pytorchjobs("doomed"), timeout=30, what="the last attempt deleted")


def test_an_invalid_spec_fails_with_a_condition_and_an_event_and_creates_nothing(
    runs: Runs, bucket: str
) -> None:
    body = spec_body("bad", bucket, training__tensorParallel=32, training__pipelineParallel=1)
    runs.create(body)
    status = runs.wait_phase("bad", "Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.training.tensorParallel" in failed["message"]
    events = runs.events("bad")
    assert any(e["reason"] == "Failed" and e["type"] == "Warning" for e in events)
    assert runs.child_names("bad") == []


def test_killing_the_operator_mid_run_creates_no_duplicates_and_the_run_completes(
    runs: Runs, operator: OperatorProcess, bucket: str, s3_env: S3Server
) -> None:
    body = spec_body("phoenix", bucket, training__maxSteps=20)
    runs.create(body)
    runs.wait_phase("phoenix", "Preflight")
    operator.kill()
    finish_gang(runs, "phoenix", "phoenix-preflight")
    operator.start()
    runs.wait_phase("phoenix", "Training", timeout=90)
    runs.training_pods("phoenix", 1, count=2)
    operator.kill()
    operator.start()
    operator.kill()  # a crash loop right after start
    operator.start()
    FakeTrainer(body["spec"]["checkpoints"]["s3Uri"]).progress(
        attempt=1, step=20, max_steps=20, committed=20
    )
    finish_gang(runs, "phoenix", "phoenix-train-1")
    status = runs.wait_phase("phoenix", "Succeeded", timeout=90)
    assert status["attempt"] == 1
    assert runs.child_names("phoenix") == [
        "phoenix-export",
        "phoenix-preflight",
        "phoenix-tokenize",
        "phoenix-train-1",
        "phoenix-weights",
    ]
    assert phase_events(runs, "phoenix") == PHASES


def test_deleting_a_run_removes_its_children_and_keeps_its_s3_data(
    runs: Runs, bucket: str, s3_env: S3Server
) -> None:
    body = quick("gone", bucket)
    runs.create(body)
    runs.wait_phase("gone", "Training", timeout=90)
    runs.training_pods("gone", 1, count=2)
    FakeTrainer(body["spec"]["checkpoints"]["s3Uri"]).commit(5)
    runs.delete("gone")
    wait_for(lambda: runs.get("gone") is None, timeout=30, what="the run deleted")
    wait_for(
        lambda: not runs.child_names("gone") and not runs.pods("cpt.dev/run=gone"),
        timeout=60,
        what="children garbage-collected",
    )
    assert "runs/gone/step_5/cpt-commit.json" in s3_keys(s3_env, bucket, "runs/gone/")


def test_suspend_stops_training_and_resume_continues_the_same_attempt(
    runs: Runs, bucket: str, s3_env: S3Server
) -> None:
    body = quick("nap", bucket, training__maxSteps=10)
    runs.create(body)
    runs.wait_phase("nap", "Training", timeout=90)
    runs.training_pods("nap", 1, count=2)
    trainer = FakeTrainer(body["spec"]["checkpoints"]["s3Uri"])
    trainer.commit(4)

    runs.patch_spec("nap", {"suspend": True})
    status = runs.wait_phase("nap", "Suspended")
    assert status["suspendedPhase"] == "Training" and status["attempt"] == 1
    wait_for(
        lambda: (
            not runs.pytorchjobs("nap") and not runs.pods("cpt.dev/run=nap,cpt.dev/stage=train")
        ),
        timeout=60,
        what="the attempt stopped",
    )

    runs.patch_spec("nap", {"suspend": False})
    status = runs.wait(
        "nap",
        lambda s: s.get("phase") == "Training" and s.get("children", {}).get("train"),
        timeout=60,
        what="training resumed",
    )
    assert status["attempt"] == 1 and status["resumeFrom"]["step"] == 4
    reasons = runs.event_reasons("nap")
    assert "Suspended" in reasons
    runs.training_pods("nap", 1, count=2)
    trainer.progress(attempt=1, step=10, max_steps=10, committed=10)
    finish_gang(runs, "nap", "nap-train-1")
    runs.wait_phase("nap", "Succeeded", timeout=60)
