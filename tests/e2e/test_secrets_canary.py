"""No secret value reaches a CR, status, event, log, child manifest or S3 object (issue 8).

Secrets with recognisable canary values (an HF token, static S3 keys, a W&B key) are referenced
by a real run: every stage runs as real processes on the executor nodes (tokenize, 1-node
torchrun training, export) and reaches S3 with the canary access key through a recording proxy,
which proves the references really resolved inside the pods. Afterwards the canaries are
searched for everywhere the system writes: the run object with its status and kopf
annotations, every Event of the namespace, the operator's log, the Jobs, PyTorchJobs and pods
(whose credential env must be `secretKeyRef`, never `value`), the pods' own output, and every
object the workload wrote to S3.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from e2e.harness import OperatorProcess, Runs, prepare_real_inputs, real_run_spec
from faults._support import S3FaultProxy

from fixtures.executor import Executor
from fixtures.s3 import S3Server

pytestmark = pytest.mark.e2e

RUN = "canary"
TOKEN = f"hf_CANARY{secrets.token_hex(12)}"
ACCESS_KEY = f"AKIACANARY{secrets.token_hex(5).upper()}"
SECRET_KEY = f"canary/secret+{secrets.token_hex(16)}"
WANDB_KEY = f"wandb-canary-{secrets.token_hex(12)}"
CANARIES = (TOKEN, ACCESS_KEY, SECRET_KEY, WANDB_KEY)
CREDENTIAL_ENV = {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY"}


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[S3FaultProxy]:
    p = S3FaultProxy(s3.endpoint_url)  # no faults: it only records who signed
    yield p
    p.close()


def make_secrets(runs: Runs) -> None:
    for name, data in (
        ("hf-token", {"token": TOKEN}),
        ("canary-s3", {"id": ACCESS_KEY, "secret": SECRET_KEY}),
        ("wandb", {"api-key": WANDB_KEY}),
    ):
        runs.api.create(
            f"/api/v1/namespaces/{runs.ns}/secrets",
            {"metadata": {"name": name}, "stringData": data},
        )


def run_spec(bucket: str, endpoint: str) -> dict[str, Any]:
    wandb = {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
    return real_run_spec(
        RUN,
        bucket,
        endpoint,
        data={"shards": 1},
        training={
            "nodes": 1,
            "globalBatchSize": 2,
            "maxSteps": 4,
            "optimizer": {"lr": 1e-3, "minLr": 1e-4, "warmupSteps": 1},
        },
        env=[{"name": "WANDB_API_KEY", "valueFrom": wandb}],
        checkpoints={"everySteps": 2, "keep": 2},
        runtime={
            "hfTokenSecretRef": {"name": "hf-token", "key": "token"},
            "s3CredentialsSecretRef": {
                "name": "canary-s3",
                "accessKeyIdKey": "id",
                "secretAccessKeyKey": "secret",
            },
        },
        max_attempts=1,
    )


def leaks(where: str, text: str) -> list[str]:
    return [f"{where}: {c[:12]}..." for c in CANARIES if c in text]


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container (init included) of a pod, a Job's template or a PyTorchJob's replicas."""
    specs: list[dict[str, Any]] = []
    kind = obj.get("kind")
    if kind == "Pod":
        specs.append(obj["spec"])
    elif kind == "Job":
        specs.append(obj["spec"]["template"]["spec"])
    elif kind == "PyTorchJob":
        specs += [r["template"]["spec"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    for spec in specs:
        yield from spec.get("initContainers") or []
        yield from spec.get("containers") or []


def test_no_secret_value_leaks_anywhere_while_a_real_run_uses_them(
    runs: Runs,
    operator: OperatorProcess,
    executor: Executor,
    proxy: S3FaultProxy,
    s3: S3Server,
    bucket: str,
) -> None:
    prepare_real_inputs(s3, bucket)
    make_secrets(runs)
    runs.create(run_spec(bucket, proxy.url))
    status = runs.wait_phase(RUN, "Succeeded", timeout=600)
    assert status["checkpoint"]["step"] == 4

    # The references resolved: the pods signed their S3 requests with the canary key id.
    assert ACCESS_KEY in proxy.access_keys, proxy.access_keys
    assert len(proxy.requests(r"PUT .*/runs/canary/step_4/")) > 0

    found: list[str] = []
    api, ns = runs.api, runs.ns
    found += leaks("the run", json.dumps(api.get(runs.path(RUN))))
    found += leaks("events", json.dumps(api.get(f"/api/v1/namespaces/{ns}/events")))
    found += leaks("operator log", operator.log_path.read_text(errors="replace"))
    children: list[dict[str, Any]] = []
    for kind, path in (
        ("Job", f"/apis/batch/v1/namespaces/{ns}/jobs"),
        ("PyTorchJob", f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"),
        ("Pod", f"/api/v1/namespaces/{ns}/pods"),
    ):
        children += [{**o, "kind": kind} for o in api.get(path)["items"]]
    assert {o["kind"] for o in children} >= {"Job", "PyTorchJob", "Pod"}
    pods_checked = 0
    for obj in children:
        name = f"{obj['kind']} {obj['metadata']['name']}"
        found += leaks(name, json.dumps(obj))
        for c in containers(obj):
            env = {e["name"]: e for e in c.get("env") or []}
            for var in CREDENTIAL_ENV & set(env):
                assert "value" not in env[var], f"{name}: {var} is a literal value"
                assert "secretKeyRef" in env[var]["valueFrom"], f"{name}: {var}"
            if obj["kind"] == "Pod" and c["name"] != "init-pytorch":
                assert set(env) >= CREDENTIAL_ENV, f"{name}: missing {CREDENTIAL_ENV - set(env)}"
                pods_checked += 1
    assert pods_checked >= 3  # tokenize, training master, export
    for log in sorted((runs.cluster.logs_dir / "executor").glob(f"{ns}_*.log")):
        found += leaks(f"pod output {log.name}", log.read_text(errors="replace"))
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            found += leaks(f"s3://{bucket}/{o['Key']}", body.decode("latin-1"))
    assert not found, f"secret values leaked: {found}"
