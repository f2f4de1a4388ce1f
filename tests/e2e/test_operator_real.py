"""The real workload, orchestrated by the operator on the real control plane (issue 5, item 8).

Every stage pod is placed by the scheduler onto the executor nodes (exec-0/exec-1), where
tests/fixtures/executor.py runs it as genuine local processes: real tokenization into the S3
server, real 2-node CPU torchrun training with checkpoints synced to S3, a worker killed
mid-run, attempt 2 resuming from the newest committed checkpoint, and a real export to a
Hugging Face model that loads. Nothing here writes progress or checkpoints on the trainer's
behalf.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from e2e.harness import (
    REAL_VOCAB,
    Runs,
    committed_steps,
    download_prefix,
    prepare_real_inputs,
    real_run_spec,
    s3_keys,
)

from fixtures.cluster import wait_for
from fixtures.executor import Executor
from fixtures.s3 import S3Server

# Minutes of real CPU work on a 2-core box shared with other suites: above the default 900 s.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

RUN = "real"
MAX_STEPS = 60
EVERY = 5
VOCAB = REAL_VOCAB


def run_spec(bucket: str, s3: S3Server) -> dict[str, Any]:
    return real_run_spec(
        RUN,
        bucket,
        s3.endpoint_url,
        data={"shards": 2, "heldOutFraction": 0.05},
        training={
            "nodes": 2,
            "globalBatchSize": 4,
            "maxSteps": MAX_STEPS,
            "evalEverySteps": 20,
            "optimizer": {"lr": 1e-3, "minLr": 1e-4, "warmupSteps": 2},
        },
        checkpoints={"everySteps": EVERY, "keep": 3},
        runtime={"s3CredentialsSecretRef": {"name": "s3-credentials"}},
        max_attempts=2,
    )


def test_the_operator_runs_the_real_workload_through_a_worker_failure_to_a_loadable_model(
    runs: Runs, executor: Executor, bucket: str, s3: S3Server
) -> None:
    prepare_real_inputs(s3, bucket)
    runs.create_s3_secret(s3)
    runs.create(run_spec(bucket, s3))

    status = runs.wait_phase(RUN, "Training", timeout=300)  # real tokenization of 2 shards
    assert f"runs/{RUN}/data/manifest.json" in s3_keys(s3, bucket, f"runs/{RUN}/data/")
    pods = runs.training_pods(RUN, 1, count=2, timeout=120)
    assert {p["spec"]["nodeName"] for p in pods} == {"exec-0", "exec-1"}

    # Kill the worker once the trainer has committed a checkpoint, well before the end.
    wait_for(
        lambda: committed_steps(s3, bucket, f"runs/{RUN}/"),
        timeout=300,
        what="a committed checkpoint",
        interval=0.2,
    )
    worker = next(p for p in pods if "-worker-" in p["metadata"]["name"])
    killed_after = committed_steps(s3, bucket, f"runs/{RUN}/")[-1]
    assert killed_after < MAX_STEPS, "training finished before the fault could be injected"
    assert executor.kill(runs.ns, worker["metadata"]["name"]) > 0

    status = runs.wait(
        RUN,
        lambda s: s.get("attempt") == 2 and s.get("children", {}).get("train"),
        timeout=180,
        what="attempt 2 started",
    )
    resumed_from = status["resumeFrom"]["step"]
    assert resumed_from >= killed_after and resumed_from % EVERY == 0
    assert status["attempts"][0]["reason"] in ("PodFailed", "TrainingJobFailed")

    status = runs.wait_phase(RUN, "Succeeded", timeout=600)
    assert status["checkpoint"]["step"] == MAX_STEPS
    assert status["progress"]["stepOfMax"] == f"{MAX_STEPS}/{MAX_STEPS}"
    # The trainer's last held-out loss per source (at the last step), which the operator
    # read from progress.json while exporting.
    held_out = status["eval"]
    assert held_out["step"] == MAX_STEPS and held_out["sources"]
    assert all(0 < s["loss"] < 20 for s in held_out["sources"])
    assert held_out["summary"].endswith(f"@{MAX_STEPS}")
    master2 = next(
        p
        for p in runs.pods(f"cpt.dev/run={RUN},cpt.dev/attempt=2")
        if "-master-" in p["metadata"]["name"]
    )
    assert f"(step {resumed_from})" in executor.logs(runs.ns, master2["metadata"]["name"])

    # The exported model: complete, evaluated, and loadable by plain transformers.
    out = set(s3_keys(s3, bucket, f"models/{RUN}/"))
    for name in ("_SUCCESS", "config.json", "model.safetensors", "eval.json", "tokenizer.json"):
        assert f"models/{RUN}/{name}" in out, name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = s3.client()
    evaluation = json.loads(
        client.get_object(Bucket=bucket, Key=f"models/{RUN}/eval.json")["Body"].read()
    )
    assert evaluation["step"] == MAX_STEPS and evaluation["loss"] > 0
    with tempfile.TemporaryDirectory() as tmp:
        download_prefix(s3, bucket, f"models/{RUN}/", Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
        ids = tok("Document 1. the model reads", return_tensors="pt")
        logits = model(**ids).logits
        assert logits.shape[-1] == VOCAB
    reasons = runs.event_reasons(RUN)
    assert reasons.count("AttemptFailed") == 1 and "Succeeded" in reasons

    # `cpt plot RUN`: both attempts' curves from the run's TensorBoard files in S3, attempt 2
    # marked at the step it resumed from; the PNG stays in the cluster logs for a person.
    png = runs.cluster.logs_dir / f"{RUN}-curves.png"
    argv = ["plot", RUN, "--namespace", runs.ns, "--output", str(png), "--json"]
    plotted = subprocess.run(
        [sys.executable, "-m", "cpt_operator.cli", *argv],
        env={**runs.cluster.env(), **s3.env},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert plotted.returncode == 0, plotted.stderr
    curves = json.loads(plotted.stdout)
    assert [(a["attempt"], a["resumeStep"]) for a in curves["attempts"]] == [
        (1, 0),
        (2, resumed_from),
    ]
    second = curves["attempts"][1]["series"]["train/loss"]
    assert second[0][0] == resumed_from + 1 and second[-1][0] == MAX_STEPS
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
