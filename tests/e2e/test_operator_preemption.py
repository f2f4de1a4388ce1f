"""The real preflight check's measurement in status.preflight, then a training pod deleted
with a grace period (a drain, a spot interruption, a preemption), on
the real control plane with the real workload (the executor runs the pods as local processes):
the trainer gets SIGTERM, finishes its step, commits a checkpoint and exits 75; the operator
records the attempt as Preempted without spending the retry budget (maxAttempts is 1 here),
and attempt 2 resumes from that very checkpoint and finishes the run."""

from __future__ import annotations

from typing import Any

import pytest
from e2e.harness import Runs, committed_steps, prepare_real_inputs, real_run_spec

from fixtures.cluster import wait_for
from fixtures.executor import Executor
from fixtures.s3 import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

RUN = "preempt"
MAX_STEPS = 200
EVERY = 10


def run_spec(bucket: str, s3: S3Server) -> dict[str, Any]:
    body = real_run_spec(
        RUN,
        bucket,
        s3.endpoint_url,
        data={"shards": 2, "heldOutFraction": 0.05},
        training={
            "nodes": 2,
            "globalBatchSize": 4,
            "maxSteps": MAX_STEPS,
            "optimizer": {"lr": 1e-3, "minLr": 1e-4, "warmupSteps": 2},
        },
        checkpoints={"everySteps": EVERY, "keep": 3},
        runtime={"s3CredentialsSecretRef": {"name": "s3-credentials"}},
        max_attempts=1,
    )
    # The real preflight check too: a 2-node all-reduce whose measurement lands in status.
    body["spec"]["resiliency"]["preflight"] = {"enabled": True}
    return body


def test_a_training_pod_deleted_with_a_grace_period_checkpoints_and_resumes_without_a_retry(
    runs: Runs, executor: Executor, bucket: str, s3: S3Server
) -> None:
    prepare_real_inputs(s3, bucket)
    runs.create_s3_secret(s3)
    runs.create(run_spec(bucket, s3))
    status = runs.wait_phase(RUN, "Training", timeout=300)
    preflight = status["preflight"]
    assert preflight["passed"] is True and preflight["worldSize"] == 2
    assert preflight["busBandwidthGbps"] > 0 and preflight["minBusBandwidthGbps"] == 0
    assert "PreflightMeasured" in runs.event_reasons(RUN)
    pods = runs.training_pods(RUN, 1, count=2, timeout=120)
    grace = pods[0]["spec"]["terminationGracePeriodSeconds"]
    assert 60 <= grace <= 300  # from the plan, within maxTerminationGracePeriodSeconds
    wait_for(
        lambda: committed_steps(s3, bucket, f"runs/{RUN}/"),
        timeout=300,
        what="a committed checkpoint",
        interval=0.2,
    )
    seen = committed_steps(s3, bucket, f"runs/{RUN}/")[-1]
    assert seen < MAX_STEPS - EVERY, "training finished before the preemption could be injected"
    master = next(p for p in pods if "-master-" in p["metadata"]["name"])
    runs.api.delete(
        f"/api/v1/namespaces/{runs.ns}/pods/{master['metadata']['name']}",
        gracePeriodSeconds=grace,
    )

    status = runs.wait(
        RUN,
        lambda s: s.get("attempt") == 2 and s.get("children", {}).get("train"),
        timeout=180,
        what="attempt 2 started",
    )
    first = status["attempts"][0]
    assert first["reason"] == "Preempted", first
    resumed = status["resumeFrom"]["step"]
    # The stop checkpoint: the newest commit, at or after the last periodic one before the
    # signal (the trainer finished its step and saved it, between two periodic saves).
    assert resumed >= seen and resumed == committed_steps(s3, bucket, f"runs/{RUN}/")[-1]
    reasons = runs.event_reasons(RUN)
    assert "AttemptPreempted" in reasons and "AttemptFailed" not in reasons

    status = runs.wait_phase(RUN, "Succeeded", timeout=600)
    assert status["checkpoint"]["step"] == MAX_STEPS
    master2 = next(
        p
        for p in runs.pods(f"cpt.dev/run={RUN},cpt.dev/attempt=2")
        if "-master-" in p["metadata"]["name"]
    )
    assert f"(step {resumed})" in executor.logs(runs.ns, master2["metadata"]["name"])
