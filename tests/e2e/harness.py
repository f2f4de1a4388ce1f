"""Test harness for the operator on the local control plane.

* `install_crd`: the generated ContinualPretrain CRD, server-side applied.
* `OperatorProcess`: `python -m cpt_operator` as a real subprocess (KUBECONFIG + the S3
  server's AWS env), watching one namespace, logging to `<cluster logs>/operator-<ns>.log`.
* `Runs`: create/read/patch runs and read their children, events and S3 objects.
* `FakeTrainer`: stands in for the trainer where KWOK only pretends to run pods: it writes
  progress.json and genuinely committed checkpoints with the workload's own storage code.
* `prepare_real_inputs` / `real_run_spec`: inputs in S3 and the run for tests where every
  stage runs as real processes on the executor nodes (tests/fixtures/executor.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from fixtures.cluster import REPO, ApiError, Cluster, wait_for
from fixtures.s3 import REGION, S3Server

CRD_FILE = REPO / "crds" / "cpt.dev_continualpretrains.yaml"
SPECS = REPO / "tests" / "golden" / "specs"
API = "/apis/cpt.dev/v1alpha1"


def install_crd(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))

    def established() -> bool:
        crd = cluster.api.get(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/continualpretrains.cpt.dev"
        )
        conds = crd.get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

    wait_for(established, timeout=30, what="ContinualPretrain CRD Established")

    def served() -> bool:
        # A changed schema re-initialises the resource's storage: lists answer 429 until done.
        try:
            cluster.api.get(f"{API}/continualpretrains?limit=1")
        except ApiError as err:
            if err.status == 429:
                return False
            raise
        return True

    wait_for(served, timeout=30, what="ContinualPretrain storage ready")


class OperatorProcess:
    """The operator as it runs in its image, one per test namespace."""

    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        s3: S3Server,
        *,
        resync: float = 1.0,
        metrics_port: int = 0,
    ) -> None:
        self.cluster = cluster
        self.metrics_port = metrics_port
        """The /metrics port; 0 (the default) serves none, so operators never collide."""
        self.namespace = namespace
        self.s3 = s3
        self.resync = resync
        self.log_path = cluster.logs_dir / f"operator-{namespace}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in self.cluster.env().items()
            if not k.startswith(("AWS_", "CPT_", "KOPF_"))
        }
        env.update(self.s3.env)
        env.update(
            {
                "CPT_WATCH_NAMESPACES": self.namespace,
                "CPT_LIVENESS_ENDPOINT": "",
                "CPT_RESYNC_SECONDS": str(self.resync),
                "CPT_METRICS_PORT": str(self.metrics_port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== operator start #{self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cpt_operator"],
                cwd=REPO,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: no cleanup, exactly like a node losing the operator pod."""
        self.stop(signal.SIGKILL)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spec_body(
    name: str,
    bucket: str,
    *,
    template: str = "trn1-nxd",
    run: str | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """A run from a golden spec with every storage URI moved into `bucket`.

    `changes` are dotted paths with `__`: `resiliency__maxAttempts=2`."""
    body = yaml.safe_load((SPECS / f"{template}.yaml").read_text())
    run = run or name
    body["metadata"] = {"name": run}
    spec = body["spec"]
    spec["model"]["source"] = f"s3://{bucket}/models/base/"
    spec["data"]["sources"] = [{"uri": f"s3://{bucket}/corpus/", "format": "jsonl"}]
    spec["data"].pop("tokenizedUri", None)
    spec["checkpoints"]["s3Uri"] = f"s3://{bucket}/runs/{run}/"
    spec["output"]["s3Uri"] = f"s3://{bucket}/models/{run}/"
    spec.setdefault("runtime", {}).pop("neuronCompileCacheUri", None)
    # These would need objects the test namespace lacks (the operator checks that referenced
    # Secrets exist before creating children); tests that want one create it and add the ref.
    # kueueQueueName too: with it the training job is created suspended until a Kueue admits
    # it (tests/faults/test_fault_kueue.py sets it, with Kueue running).
    for absent in (
        "kueueQueueName",
        "hfTokenSecretRef",
        "s3CredentialsSecretRef",
        "priorityClassName",
        "serviceAccountName",
    ):
        spec["runtime"].pop(absent, None)
    for dotted, value in changes.items():
        node = spec
        *path, last = dotted.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return body


class Runs:
    """ContinualPretrain runs and their children in one namespace."""

    def __init__(self, cluster: Cluster, namespace: str, operator: OperatorProcess | None) -> None:
        self.cluster = cluster
        self.api = cluster.api
        self.ns = namespace
        self.operator = operator

    # -- runs ------------------------------------------------------------------------------

    def path(self, name: str = "") -> str:
        base = f"{API}/namespaces/{self.ns}/continualpretrains"
        return f"{base}/{name}" if name else base

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        obj.setdefault("apiVersion", "cpt.dev/v1alpha1")
        obj.setdefault("kind", "ContinualPretrain")
        obj["metadata"]["namespace"] = self.ns
        return dict(self.api.create(self.path(), obj, exist_ok=False))

    def get(self, name: str) -> dict[str, Any] | None:
        return self.api.get_or_none(self.path(name))  # type: ignore[no-any-return]

    def status(self, name: str) -> dict[str, Any]:
        obj = self.get(name) or {}
        return dict(obj.get("status") or {})

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.api.patch(self.path(name), {"spec": spec})

    def delete(self, name: str) -> None:
        self.api.delete(self.path(name), propagationPolicy="Background")

    def wait(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], Any],
        *,
        timeout: float,
        what: str,
        fail_fast: bool = True,
    ) -> dict[str, Any]:
        """Poll the run's status until `predicate` holds. A run that fails (or an operator
        that dies) ends the wait at once with the status and the operator's log."""
        dead: list[str] = []

        def check() -> dict[str, Any] | None:
            status = self.status(name)
            if self.operator is not None and not self.operator.alive():
                dead.append("the operator died")
                return status
            if fail_fast and status.get("phase") == "Failed":
                dead.append("the run failed")
                return status
            return status if predicate(status) else None

        def report(headline: str) -> str:
            status = json.dumps(self.status(name), indent=1)[:4000]
            tail = self.operator.log_tail() if self.operator else ""
            return f"{headline}\nstatus: {status}\noperator log:\n{tail}"

        try:
            status: dict[str, Any] = wait_for(check, timeout=timeout, what=what, interval=0.3)
        except TimeoutError as err:
            raise AssertionError(report(str(err))) from None
        if dead:
            raise AssertionError(report(f"{dead[0]} while waiting for {what}"))
        return status

    def wait_phase(self, name: str, phase: str, *, timeout: float = 60) -> dict[str, Any]:
        return self.wait(
            name,
            lambda s: s.get("phase") == phase,
            timeout=timeout,
            what=f"{name} phase {phase}",
            fail_fast=phase != "Failed",
        )

    # -- children --------------------------------------------------------------------------

    def jobs(self, run: str) -> list[dict[str, Any]]:
        path = f"/apis/batch/v1/namespaces/{self.ns}/jobs?labelSelector=cpt.dev/run={run}"
        return list(self.api.get(path)["items"])

    def pytorchjobs(self, run: str) -> list[dict[str, Any]]:
        path = (
            f"/apis/kubeflow.org/v1/namespaces/{self.ns}/pytorchjobs"
            f"?labelSelector=cpt.dev/run={run}"
        )
        return list(self.api.get(path)["items"])

    def pods(self, selector: str) -> list[dict[str, Any]]:
        path = f"/api/v1/namespaces/{self.ns}/pods?labelSelector={selector}"
        return list(self.api.get(path)["items"])

    def child_names(self, run: str) -> list[str]:
        return sorted(o["metadata"]["name"] for o in self.jobs(run) + self.pytorchjobs(run))

    def training_pods(
        self, run: str, attempt: int, *, count: int, timeout: float = 60
    ) -> list[Any]:
        selector = f"cpt.dev/run={run},cpt.dev/attempt={attempt}"

        def running() -> list[Any] | None:
            pods = [
                p
                for p in self.pods(selector)
                if p["status"].get("phase") == "Running"
                and not p["metadata"].get("deletionTimestamp")
            ]
            return pods if len(pods) >= count else None

        return wait_for(running, timeout=timeout, what=f"{count} running pods of {selector}")  # type: ignore[no-any-return]

    def annotate_pod(self, name: str, annotations: dict[str, str]) -> None:
        self.api.patch(
            f"/api/v1/namespaces/{self.ns}/pods/{name}", {"metadata": {"annotations": annotations}}
        )

    def finish_pod(self, name: str, *, ok: bool = True, exit_code: int = 1) -> None:
        """Drive a KWOK pod to Succeeded or Failed (see hack/devcluster/kwok-stages.yaml)."""
        ann = {"test.cpt.dev/outcome": "succeed" if ok else "fail"}
        if not ok:
            ann["test.cpt.dev/exit-code"] = str(exit_code)
        self.annotate_pod(name, ann)

    def events(self, run: str) -> list[dict[str, Any]]:
        path = (
            f"/api/v1/namespaces/{self.ns}/events"
            f"?fieldSelector=involvedObject.kind=ContinualPretrain,involvedObject.name={run}"
        )
        items = list(self.api.get(path)["items"])
        items.sort(
            key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["creationTimestamp"])
        )
        return items

    def event_reasons(self, run: str) -> list[str]:
        return [e["reason"] for e in self.events(run)]

    def create_s3_secret(self, s3: S3Server, name: str = "s3-credentials") -> None:
        self.api.create(
            f"/api/v1/namespaces/{self.ns}/secrets",
            {
                "metadata": {"name": name},
                "stringData": {
                    "AWS_ACCESS_KEY_ID": s3.env["AWS_ACCESS_KEY_ID"],
                    "AWS_SECRET_ACCESS_KEY": s3.env["AWS_SECRET_ACCESS_KEY"],
                },
            },
        )


class FakeTrainer:
    """Writes what rank 0 of the trainer would: progress.json and committed checkpoints, with
    the workload's own storage code (the test process has the S3 server's AWS env)."""

    def __init__(self, checkpoint_uri: str) -> None:
        self.root = checkpoint_uri.rstrip("/") + "/"

    def progress(
        self,
        *,
        attempt: int,
        step: int,
        max_steps: int,
        committed: int | None,
        held_out: dict[str, float] | None = None,
    ) -> None:
        """``held_out``: the loss per source of an evaluation at ``step``."""
        from cpt_training import storage

        doc: dict[str, Any] = {
            "attempt": attempt,
            "step": step,
            "maxSteps": max_steps,
            "loss": 2.5 - step / 100,
            "tokensPerSec": 50000.0,
            "mfu": 0.31,
            "lr": 1e-4,
            "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "lastCommittedStep": committed,
        }
        if held_out is not None:
            doc["eval"] = {
                "step": step,
                "sources": {
                    name: {"loss": loss, "perplexity": math.exp(loss)}
                    for name, loss in held_out.items()
                },
            }
        storage.write_json(self.root + "progress.json", doc)

    def commit(self, step: int) -> str:
        from cpt_training.checkpoint import tag_for_step, upload_and_commit

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "model.pt").write_bytes(os.urandom(256))
            (Path(tmp) / "optim.pt").write_bytes(os.urandom(128))
            uri = self.root + tag_for_step(step)
            upload_and_commit(tmp, uri, step=step)
        return uri


def s3_keys(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    out: list[str] = []
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def committed_steps(s3: S3Server, bucket: str, prefix: str) -> list[int]:
    """Steps with a commit marker under `prefix` (e.g. `runs/r/`)."""
    steps = []
    for key in s3_keys(s3, bucket, prefix):
        m = re.search(r"/step_(\d+)/cpt-commit\.json$", key)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


@contextlib.contextmanager
def running_operator(
    cluster: Cluster, namespace: str, s3: S3Server, *, resync: float = 1.0
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster, namespace, s3, resync=resync)
    op.start()
    try:
        yield op
    finally:
        op.stop()


__all__ = [
    "ApiError",
    "FakeTrainer",
    "OperatorProcess",
    "Runs",
    "committed_steps",
    "install_crd",
    "running_operator",
    "s3_keys",
    "spec_body",
]


# ---------------------------------------------------------------------------------------------
# Real runs on the executor nodes
# ---------------------------------------------------------------------------------------------

REAL_VOCAB = 384
REAL_MODEL = {
    "vocab_size": REAL_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
EXECUTOR_ONLY = {"cpt.dev/local-executor": "true"}


def download_prefix(s3: S3Server, bucket: str, prefix: str, dest: Path) -> list[str]:
    """Every object under `prefix` into `dest` (keys relative to the prefix); returns keys."""
    client = s3.client()
    keys = s3_keys(s3, bucket, prefix)
    for key in keys:
        path = dest / key[len(prefix) :].lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(path))
    return keys


def upload_dir(s3: S3Server, bucket: str, local: Path, prefix: str) -> None:
    client = s3.client()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local)}")


def prepare_real_inputs(s3: S3Server, bucket: str) -> None:
    """The "HF base model" (a seeded tiny Llama + its tokenizer, as ``REAL_MODEL``) and a
    corpus, in S3 under ``models/base/`` and ``corpus/``."""
    from cpt_training.testing import make_tiny_llama
    from fixtures.textgen import make_corpus, save_tokenizer, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs = make_corpus(root / "corpus", n_docs=300, seed=7)
        tok_dir = save_tokenizer(train_tokenizer(docs, vocab_size=REAL_VOCAB), root / "tok")
        make_tiny_llama(
            root / "base",
            REAL_VOCAB,
            hidden=REAL_MODEL["hidden_size"],
            layers=REAL_MODEL["num_hidden_layers"],
            heads=REAL_MODEL["num_attention_heads"],
            kv_heads=REAL_MODEL["num_key_value_heads"],
            seq=128,
            tokenizer_dir=tok_dir,
        )
        upload_dir(s3, bucket, root / "corpus", "corpus")
        upload_dir(s3, bucket, root / "base", "models/base")


def real_run_spec(
    run: str,
    bucket: str,
    endpoint: str,
    *,
    data: dict[str, Any],
    training: dict[str, Any],
    checkpoints: dict[str, Any],
    runtime: dict[str, Any],
    max_attempts: int,
    env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A run of the inputs of :func:`prepare_real_inputs` on the executor nodes (CPU, one
    process per node, fp32), its pods reaching S3 at ``endpoint``. The keyword sections are
    merged into the common ones; ``env`` is added to the training env."""
    train_env = [
        {"name": "AWS_ENDPOINT_URL", "value": endpoint},
        {"name": "AWS_DEFAULT_REGION", "value": REGION},
        {"name": "OMP_NUM_THREADS", "value": "1"},
        *(env or []),
    ]
    return {
        "metadata": {"name": run},
        "spec": {
            "model": {"source": f"s3://{bucket}/models/base/", "configOverrides": REAL_MODEL},
            "data": {
                "sources": [{"uri": f"s3://{bucket}/corpus/", "format": "jsonl"}],
                "blockSize": 64,
                **data,
            },
            "training": {
                "instanceType": "local-cpu",
                "processesPerNode": 1,
                "microBatchSize": 2,
                "precision": "fp32",
                "activationCheckpointing": "none",
                "env": train_env,
                **training,
            },
            "checkpoints": {"s3Uri": f"s3://{bucket}/runs/{run}/", **checkpoints},
            "output": {"s3Uri": f"s3://{bucket}/models/{run}/"},
            "runtime": {
                "nodeSelector": EXECUTOR_ONLY,
                "toolsNodeSelector": EXECUTOR_ONLY,
                "tolerations": [
                    {
                        "key": "cpt.dev/local-executor",
                        "operator": "Equal",
                        "value": "true",
                        "effect": "NoSchedule",
                    }
                ],
                **runtime,
            },
            "resiliency": {"maxAttempts": max_attempts, "preflight": {"enabled": False}},
        },
    }
