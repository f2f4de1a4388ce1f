"""spec.resiliency.activeDeadlineSeconds on the real control plane with the live operator and
the real workload (the executor runs the pods as local processes, loopback S3): when the
deadline passes while training, the operator deletes the PyTorchJob, the trainer gets SIGTERM,
finishes its step, commits a stop checkpoint and exits; once no training pod is left the run
ends `Failed`/`DeadlineExceeded` naming that checkpoint. Then exportOnDeadline, two ways: set
on the Failed run (the only way out of Failed: the export runs and the run fails again, now
with `outputUri` and `Exported=True`), and set from the start (the export follows the stop
directly). One after the other: the executor runs every training master on the same loopback
rendezvous port, so two real trainings cannot overlap.

Each run starts with a roomy deadline that is lowered to the 60 s minimum once the trainer has
committed a checkpoint (resiliency is mutable; the new deadline counts from the run's start):
it then passes while training, however slowly this machine tokenized and started torch."""

from __future__ import annotations

import re
from typing import Any

import pytest
from e2e.harness import Runs, committed_steps, prepare_real_inputs, real_run_spec, s3_keys

from fixtures.cluster import wait_for
from fixtures.executor import Executor
from fixtures.s3 import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

DEADLINE = 60  # the CRD's minimum
LATER, UPFRONT = "late-export", "upfront-export"


def run_spec(run: str, bucket: str, s3: S3Server, *, export_on_deadline: bool) -> dict[str, Any]:
    body = real_run_spec(
        run,
        bucket,
        s3.endpoint_url,
        data={"shards": 1},
        training={"nodes": 1, "globalBatchSize": 2, "maxSteps": 100000},
        checkpoints={"everySteps": 50, "keep": 2},
        runtime={"s3CredentialsSecretRef": {"name": "s3-credentials"}},
        max_attempts=1,
    )
    body["spec"]["resiliency"].update(
        activeDeadlineSeconds=3600, exportOnDeadline=export_on_deadline
    )
    return body


def lower_deadline_once_committed(runs: Runs, run: str, s3: S3Server, bucket: str) -> None:
    wait_for(
        lambda: (
            runs.status(run).get("phase") == "Training"
            and committed_steps(s3, bucket, f"runs/{run}/")
        ),
        timeout=300,
        what=f"{run} training with a committed checkpoint",
        interval=0.5,
    )
    spec = (runs.get(run) or {})["spec"]
    runs.patch_spec(run, {"resiliency": {**spec["resiliency"], "activeDeadlineSeconds": DEADLINE}})


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == type_)


def assert_stopped_on_its_checkpoint(
    runs: Runs, run: str, status: dict[str, Any], s3: S3Server, bucket: str, executor: Executor
) -> int:
    """The run failed on its deadline after its trainer committed a stop checkpoint: the
    newest commit, named in the status and message; no training child or pod is left."""
    failed = condition(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "DeadlineExceeded", failed
    step = status["checkpoint"]["step"]
    assert step == committed_steps(s3, bucket, f"runs/{run}/")[-1]
    assert f"activeDeadlineSeconds ({DEADLINE}s) reached" in status["message"]
    assert f"step {step}" in status["message"]
    log = executor.logs(runs.ns, f"{run}-train-1-master-0")
    said = re.search(r"stopped on request at step (\d+); checkpoint (\S+) committed", log)
    assert said is not None, log[-3000:]
    assert int(said.group(1)) == step and status["checkpoint"]["uri"] == said.group(2)
    assert not runs.pytorchjobs(run), "the training PyTorchJob is still there"
    assert not runs.pods(f"cpt.dev/run={run},cpt.dev/stage=train")
    assert "DeadlineExceeded" in runs.event_reasons(run)
    return int(step)


def assert_exported(status: dict[str, Any], s3: S3Server, bucket: str, run: str, step: int) -> None:
    assert status["phase"] == "Failed"
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    assert status["outputUri"] == f"s3://{bucket}/models/{run}/"
    assert condition(status, "Exported")["status"] == "True"
    assert f"the model of step {step} is exported" in status["message"]
    assert any(k.endswith("config.json") for k in s3_keys(s3, bucket, f"models/{run}/"))


def start(runs: Runs, run: str, bucket: str, s3: S3Server, *, export_on_deadline: bool) -> None:
    prepare_real_inputs(s3, bucket)
    runs.create_s3_secret(s3)
    runs.create(run_spec(run, bucket, s3, export_on_deadline=export_on_deadline))
    lower_deadline_once_committed(runs, run, s3, bucket)


def test_a_run_past_its_deadline_stops_on_a_checkpoint_fails_and_exports_when_asked_after(
    runs: Runs, executor: Executor, bucket: str, s3: S3Server
) -> None:
    start(runs, LATER, bucket, s3, export_on_deadline=False)
    status = runs.wait_phase(LATER, "Failed", timeout=240)
    step = assert_stopped_on_its_checkpoint(runs, LATER, status, s3, bucket, executor)
    assert condition(status, "Training")["reason"] == "DeadlineExceeded"
    assert not status.get("outputUri")
    assert [j["metadata"]["name"] for j in runs.jobs(LATER)] == [f"{LATER}-tokenize"]

    spec = (runs.get(LATER) or {})["spec"]
    runs.patch_spec(LATER, {"resiliency": {**spec["resiliency"], "exportOnDeadline": True}})
    status = runs.wait(
        LATER,
        lambda s: s.get("phase") == "Failed" and s.get("outputUri"),
        timeout=240,
        what=f"{LATER} exported after its deadline",
        fail_fast=False,
    )
    assert_exported(status, s3, bucket, LATER, step)
    assert "Revived" in runs.event_reasons(LATER)


def test_a_run_with_export_on_deadline_exports_its_stop_checkpoint_and_still_fails(
    runs: Runs, executor: Executor, bucket: str, s3: S3Server
) -> None:
    start(runs, UPFRONT, bucket, s3, export_on_deadline=True)
    status = runs.wait(
        UPFRONT,
        lambda s: s.get("phase") == "Failed",
        timeout=240,
        what=f"{UPFRONT} ended",
        fail_fast=False,
    )
    step = assert_stopped_on_its_checkpoint(runs, UPFRONT, status, s3, bucket, executor)
    assert_exported(status, s3, bucket, UPFRONT, step)
    assert "Revived" not in runs.event_reasons(UPFRONT)
