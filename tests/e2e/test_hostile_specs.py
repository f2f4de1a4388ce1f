"""Malformed and hostile ContinualPretrain specs: each is refused with a message naming the
field, and creates nothing (docs/RELIABILITY.md, hostile input).

Two places refuse a spec. The API server (the CRD's schema and CEL rules) rejects what a
schema can express: the object is never stored. What needs arithmetic over the model, a look
at the cluster (Secrets, the namespace's Pod Security level) or the API server's own pod
validation (server-side dry run of the pod templates) is refused by the operator while
planning: phase Failed, a Failed condition and a Warning event that say why, zero children.

One operator and one namespace serve the whole table (starting an operator per row would
dominate the run time); every row uses its own run name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import yaml
from e2e.harness import OperatorProcess, Runs, spec_body

from fixtures import cluster as _cluster
from fixtures.cluster import ApiError, Cluster
from fixtures.s3 import S3Server

pytestmark = pytest.mark.e2e

BUCKET = "hostile-bucket"
BIG_MODEL = {
    "vocab_size": 128256,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
}


@dataclass(frozen=True)
class Case:
    id: str
    where: Literal["admission", "operator"]
    expect: tuple[str, ...]
    """Substrings of the API error / the Failed condition message (field and reason)."""
    changes: dict[str, Any] = field(default_factory=dict)
    mutate: Callable[[dict[str, Any]], None] | None = None
    reason: str = "InvalidSpec"
    strict: bool = False
    """Apply with `kubectl create --validate=strict` (what kubectl does by default)."""


def _rename(name: str) -> Callable[[dict[str, Any]], None]:
    def apply(body: dict[str, Any]) -> None:
        body["metadata"]["name"] = name

    return apply


CASES = [
    # -- wrong types and impossible numbers (the schema) ------------------------------------
    Case("steps-as-text", "admission", ("spec.training.maxSteps", "integer"),
         {"training__maxSteps": "ten"}),
    Case("fractional-nodes", "admission", ("spec.training.nodes", "integer"),
         {"training__nodes": 1.5}),
    Case("negative-steps", "admission", ("spec.training.maxSteps", "greater than or equal to 1"),
         {"training__maxSteps": -5}),
    Case("astronomic-steps", "admission", ("spec.training.maxSteps", "less than or equal to"),
         {"training__maxSteps": 10**30}),
    Case("too-many-nodes", "admission", ("spec.training.nodes", "less than or equal to 1024"),
         {"training__nodes": 100000}),
    Case("huge-batch", "admission", ("spec.training.globalBatchSize", "less than or equal to"),
         {"training__globalBatchSize": 2**62}),
    Case("huge-block", "admission", ("spec.data.blockSize", "less than or equal to 1048576"),
         {"data__blockSize": 2**40}),
    Case("zero-shards", "admission", ("spec.data.shards", "greater than or equal to 1"),
         {"data__shards": 0}),
    Case("no-sources", "admission", ("spec.data.sources", "at least 1"),
         {"data__sources": []}),
    Case("zero-attempts", "admission", ("spec.resiliency.maxAttempts", "greater than or equal"),
         {"resiliency__maxAttempts": 0}),
    Case("negative-timeout", "admission", ("spec.resiliency.pendingTimeoutSeconds", "greater"),
         {"resiliency__pendingTimeoutSeconds": -1}),
    Case("no-excluded-nodes", "admission", ("spec.resiliency.maxExcludedNodes", "greater"),
         {"resiliency__maxExcludedNodes": 0}),
    Case("negative-lr", "admission", ("spec.training.optimizer.lr", "greater than 0"),
         {"training__optimizer": {"lr": -1}}),
    Case("held-out-too-big", "admission", ("spec.data.heldOutFraction", "less than 0.5"),
         {"data__heldOutFraction": 0.9}),
    Case("steps-and-tokens", "admission", ("spec.training.maxSteps", "exactly one of"),
         {"training__maxTokens": 1000}),
    Case("batch-not-multiple", "admission", ("spec.training.globalBatchSize", "multiple of"),
         {"training__globalBatchSize": 33, "training__microBatchSize": 2}),
    Case("tp-pp-not-dividing-world", "admission", ("spec.training", "must divide"),
         {"training__tensorParallel": 3}),
    Case("unknown-instance-type", "admission", ("spec.training.instanceType", "trn1.32xlarge"),
         {"training__instanceType": "trn9.huge"}),
    Case("nxd-on-gpu", "admission", ("backend nxd runs on Trainium only",),
         {"training__instanceType": "p5.48xlarge", "training__backend": "nxd",
          "training__tensorParallel": 8, "training__pipelineParallel": 1}),
    Case("bad-toleration-operator", "admission", ("spec.runtime.tolerations[0].operator",),
         {"runtime__tolerations": [{"operator": "Maybe"}]}),
    Case("memory-not-a-quantity", "admission", ("spec.runtime.toolsResources.memory",),
         {"runtime__toolsResources": {"memory": "lots"}}),
    Case("unknown-field", "admission", ("unknown field", "turbo"),
         {"training__turbo": True}, strict=True),
    # -- names ------------------------------------------------------------------------------
    Case("name-too-long", "admission", ("metadata.name",), mutate=_rename("a" * 41)),
    Case("name-300-chars", "admission", ("metadata.name",), mutate=_rename("b" * 300)),
    Case("name-unicode", "admission", ("metadata.name",), mutate=_rename("läuft")),
    Case("name-uppercase", "admission", ("metadata.name",), mutate=_rename("Run")),
    # -- URIs -------------------------------------------------------------------------------
    Case("s3-empty-key-segment", "admission", ("checkpoints.s3Uri must be an s3://bucket",),
         {"checkpoints__s3Uri": f"s3://{BUCKET}//runs/"}),
    Case("s3-nul-byte", "admission", ("checkpoints.s3Uri must be an s3://bucket",),
         {"checkpoints__s3Uri": f"s3://{BUCKET}/a\u0000b/"}),
    Case("s3-uppercase-bucket", "admission", ("output.s3Uri must be an s3://bucket",),
         {"output__s3Uri": "s3://Bucket/x/"}),
    Case("model-over-http", "admission", ("model.source must be hf://",),
         {"model__source": "http://evil.example/model"}),
    Case("model-local-path", "admission", ("model.source must be hf://",),
         {"model__source": "/etc/passwd"}),
    Case("hf-path-traversal", "admission", ("model.source must be hf://",),
         {"model__source": "hf://../../etc"}),
    Case("s3-dotdot", "operator", ("spec.checkpoints.s3Uri", "'..' segments are not allowed"),
         {"checkpoints__s3Uri": f"s3://{BUCKET}/runs/../other-team/"}),
    Case("s3-dot", "operator", ("spec.data.tokenizedUri", "'.' and '..' segments"),
         {"data__tokenizedUri": f"s3://{BUCKET}/./data/"}),
    Case("s3-bidi-override", "operator", ("spec.output.s3Uri", "U+202E"),
         {"output__s3Uri": f"s3://{BUCKET}/models/\u202efdp.exe/"}),
    Case("s3-zero-width-space", "operator", ("spec.model.source", "U+200B"),
         {"model__source": f"s3://{BUCKET}/mod\u200bels/base/"}),
    Case("output-is-checkpoint-root", "operator", ("spec.output.s3Uri", "must differ"),
         mutate=lambda b: b["spec"]["output"].update(s3Uri=b["spec"]["checkpoints"]["s3Uri"])),
    # -- model arithmetic -------------------------------------------------------------------
    Case("tp-not-dividing-heads", "operator",
         ("spec.training.tensorParallel", "num_attention_heads (16) must be divisible"),
         {"training__tensorParallel": 32, "training__pipelineParallel": 1}),
    Case("memory-cannot-fit", "operator", ("spec.training", "does not fit", "GiB per device"),
         {"training__tensorParallel": 1, "training__pipelineParallel": 1,
          "training__globalBatchSize": 64, "model__configOverrides": BIG_MODEL}),
    # -- credentials ------------------------------------------------------------------------
    Case("credential-as-literal", "admission", ("HF_TOKEN looks like a credential",),
         {"training__env": [{"name": "HF_TOKEN", "value": "hf_abc"}]}),
    Case("reserved-env", "admission", ("MASTER_ADDR is set by the operator",),
         {"training__env": [{"name": "MASTER_ADDR", "value": "evil"}]}),
    Case("secret-ref-without-key", "admission", ("spec.runtime.hfTokenSecretRef.key",),
         {"runtime__hfTokenSecretRef": {"name": "hf-token"}}),
    Case("missing-hf-token-secret", "operator",
         ("spec.runtime.hfTokenSecretRef.name", "Secret 'no-such-hf-token' does not exist"),
         {"runtime__hfTokenSecretRef": {"name": "no-such-hf-token", "key": "token"}},
         reason="SecretNotFound"),
    Case("missing-s3-secret", "operator",
         ("spec.runtime.s3CredentialsSecretRef.name", "Secret 'no-such-keys' does not exist"),
         {"runtime__s3CredentialsSecretRef": {"name": "no-such-keys"}}, reason="SecretNotFound"),
    Case("missing-env-secret", "operator",
         ("spec.training.env[1].valueFrom.secretKeyRef.name", "'no-such-wandb'"),
         mutate=lambda b: b["spec"]["training"]["env"].append(
             {"name": "WANDB_API_KEY",
              "valueFrom": {"secretKeyRef": {"name": "no-such-wandb", "key": "k"}}}),
         reason="SecretNotFound"),
    # -- pod fields only the API server's pod validation knows ------------------------------
    Case("bad-node-selector-key", "operator", ("training pod template", "nodeSelector"),
         {"runtime__nodeSelector": {"bad key!": "x"}}),
    Case("bad-tools-selector-value", "operator", ("tokenize Job", "nodeSelector"),
         {"runtime__toolsNodeSelector": {"cpt.dev/pool": "not a valid value!"}}),
    Case("bad-affinity-operator", "operator", ("training pod template", "affinity"),
         {"runtime__affinity": {"nodeAffinity": {
             "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                 {"matchExpressions": [{"key": "zone", "operator": "Bogus"}]}]}}}}),
    Case("bad-service-account-name", "operator", ("serviceAccountName",),
         {"runtime__serviceAccountName": "Not_A_Name"}),
    Case("image-with-whitespace", "operator",
         ("spec.runtime.images.tools", "is not a container image reference"),
         {"runtime__images": {"tools": " ghcr.io/evil/tools:1 "}}),
]  # fmt: skip


def build(case: Case, name: str) -> dict[str, Any]:
    body = spec_body(name, BUCKET, **case.changes)
    body["spec"]["resiliency"] = {
        **body["spec"].get("resiliency", {}),
        "preflight": {"enabled": False},
    }
    if case.mutate is not None:
        case.mutate(body)
    body["apiVersion"], body["kind"] = "cpt.dev/v1alpha1", "ContinualPretrain"
    return body


@pytest.fixture(scope="module")
def hostile(crd: Cluster, s3: S3Server, request: pytest.FixtureRequest) -> Iterator[Runs]:
    for ns in _cluster.namespace_fixture(crd, request):
        op = OperatorProcess(crd, ns, s3)
        op.start()
        try:
            yield Runs(crd, ns, op)
        finally:
            op.stop()


def nothing_created(runs: Runs, name: str) -> None:
    assert runs.child_names(name) == [], f"{name} created children"
    assert runs.pods(f"cpt.dev/run={name}") == []


def test_the_table_has_at_least_25_rows_on_each_path() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(CASES) >= 25
    assert sum(c.where == "operator" for c in CASES) >= 10
    assert sum(c.where == "admission" for c in CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_hostile_spec_is_refused_with_a_clear_message_and_creates_nothing(
    case: Case, hostile: Runs
) -> None:
    name = f"h-{case.id}"[:40].rstrip("-")
    body = build(case, name)
    if case.where == "admission":
        if case.strict:
            proc = hostile.cluster.kubectl(
                "create", "--validate=strict", "-n", hostile.ns, "-f", "-",
                input=yaml.safe_dump(body), check=False,
            )  # fmt: skip
            assert proc.returncode != 0, f"admitted: {proc.stdout}"
            message = proc.stderr
        else:
            with pytest.raises(ApiError) as err:
                hostile.create(body)
            assert err.value.status in (400, 422), err.value
            message = str(err.value)
        for text in case.expect:
            assert text in message, f"{text!r} not in {message}"
        stored = [r["metadata"]["name"] for r in hostile.api.get(hostile.path())["items"]]
        assert body["metadata"]["name"] not in stored
        if body["metadata"]["name"].isascii() and len(body["metadata"]["name"]) <= 63:
            nothing_created(hostile, body["metadata"]["name"])
        return

    hostile.create(body)
    status = hostile.wait_phase(name, "Failed", timeout=60)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == case.reason, failed
    for text in case.expect:
        assert text in failed["message"], f"{text!r} not in {failed['message']}"
    planned = next(c for c in status["conditions"] if c["type"] == "Planned")
    assert planned["status"] == "False"
    assert status["attempt"] == 0 and not status.get("children", {}).get("train")
    warnings = [e for e in hostile.events(name) if e["type"] == "Warning"]
    assert any(case.expect[0] in e["message"] for e in warnings), json.dumps(warnings)[:2000]
    nothing_created(hostile, name)
