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
    Case("bad-node-selector-key", "operator",
         ("spec.runtime.nodeSelector: the API server rejects the training pod template",),
         {"runtime__nodeSelector": {"bad key!": "x"}}),
    Case("bad-tools-selector-value", "operator",
         ("spec.runtime.toolsNodeSelector: the API server rejects the tokenize Job",),
         {"runtime__toolsNodeSelector": {"cpt.dev/pool": "not a valid value!"}}),
    Case("bad-affinity-operator", "operator",
         ("spec.runtime.affinity: the API server rejects the training pod template",),
         {"runtime__affinity": {"nodeAffinity": {
             "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                 {"matchExpressions": [{"key": "zone", "operator": "Bogus"}]}]}}}}),
    Case("bad-service-account-name", "operator",
         ("spec.runtime.serviceAccountName: the API server rejects",),
         {"runtime__serviceAccountName": "Not_A_Name"}),
    Case("image-with-whitespace", "operator",
         ("spec.runtime.images.tools", "is not a container image reference"),
         {"runtime__images": {"tools": " ghcr.io/evil/tools:1 "}}),
    # -- round two: reserved names (docs/api.md, training.env) ------------------------------
    Case("reserved-job-completion-index", "admission",
         ("spec.training.env[0].name", "env JOB_COMPLETION_INDEX is set by the operator, the "
          "Job controller or torchrun and cannot be overridden"),
         {"training__env": [{"name": "JOB_COMPLETION_INDEX", "value": "3"}]}),
    Case("reserved-neuron-cc-flags", "admission",
         ("spec.training.env[0].name", "env NEURON_CC_FLAGS is set by the operator"),
         {"training__env": [{"name": "NEURON_CC_FLAGS", "value": "--O3"}]}),
    Case("reserved-torchelastic-prefix", "admission",
         ("env TORCHELASTIC_RUN_ID is set by the operator",),
         {"training__env": [{"name": "TORCHELASTIC_RUN_ID", "value": "x"}]}),
    Case("env-name-twice", "admission", ("spec.training.env", "env names must be unique"),
         {"training__env": [{"name": "XLA_FLAGS", "value": "a"},
                            {"name": "XLA_FLAGS", "value": "b"}]}),
    Case("hf-token-env-and-ref", "admission",
         ("spec.training.env", "HF_TOKEN is set by the operator from spec.runtime's Secret"),
         {"runtime__hfTokenSecretRef": {"name": "hf", "key": "token"},
          "training__env": [{"name": "HF_TOKEN",
                             "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}}]}),
    # -- round two: one parser (types, quantities) -------------------------------------------
    Case("compile-as-yes-string", "admission", ("spec.training.compile", "boolean"),
         {"training__compile": "yes"}),
    Case("cpu-dot", "admission",
         ("spec.runtime.toolsResources.cpu", "must be a Kubernetes quantity"),
         {"runtime__toolsResources": {"cpu": "."}}),
    Case("memory-1e400", "admission",
         ("spec.runtime.toolsResources.memory", "must be a Kubernetes quantity"),
         {"runtime__toolsResources": {"memory": "1e400"}}),
    Case("memory-negative", "admission",
         ("spec.runtime.toolsResources.memory", "not negative"),
         {"runtime__toolsResources": {"memory": "-1Gi"}}),
    Case("size-limit-not-a-quantity", "admission",
         ("spec.checkpoints.scratch.sizeLimit", "must be a Kubernetes quantity"),
         {"checkpoints__scratch": {"sizeLimit": "lots"}}),
    # -- round two: paths and costs ----------------------------------------------------------
    Case("mount-path-dotdot", "admission",
         ("spec.checkpoints.scratch.mountPath", "'.' and '..' segments are not allowed"),
         {"checkpoints__scratch": {"mountPath": "/scratch/../dev/shm"}}),
    Case("mount-over-dev-shm", "operator",
         ("spec.checkpoints.scratch.mountPath", "'/dev/shm': lies in /dev"),
         {"checkpoints__scratch": {"mountPath": "/dev/shm"}}),
    Case("hostpath-node-root", "operator",
         ("spec.checkpoints.scratch.path", "must not be / (the whole filesystem)"),
         {"checkpoints__scratch": {"type": "hostPath", "path": "/"}}),
    Case("output-inside-checkpoints", "operator",
         ("spec.output.s3Uri", "lie neither inside nor around it"),
         mutate=lambda b: b["spec"]["output"].update(
             s3Uri=b["spec"]["checkpoints"]["s3Uri"] + "model/")),
    Case("tokens-beyond-max-steps", "operator",
         ("spec.training.maxTokens", "more than maxSteps allows (1099511627776)"),
         mutate=lambda b: (b["spec"]["training"].pop("maxSteps"),
                           b["spec"]["training"].update(maxTokens=2**60),
                           b["spec"]["data"].update(blockSize=8))),
    # -- round two: priority ----------------------------------------------------------------
    Case("system-priority-class", "operator",
         ("spec.runtime.priorityClassName", "'system-node-critical' is a system priority "
          "class", "operator.allowSystemPriorityClasses=true"),
         {"runtime__priorityClassName": "system-node-critical"}, reason="SystemPriorityClass"),
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
    assert len(ids) == len(set(ids)) and len(CASES) >= 60
    assert sum(c.where == "operator" for c in CASES) >= 20
    assert sum(c.where == "admission" for c in CASES) >= 35
    assert len(UPDATE_CASES) >= 10


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


# -- round two: updates are validated like creates (reconcile/accept.py) ---------------------


@dataclass(frozen=True)
class UpdateCase:
    id: str
    where: Literal["admission", "operator"]
    expect: tuple[str, ...]
    change: Callable[[dict[str, Any]], dict[str, Any]]
    """The merge patch to the running run's spec (given that spec)."""
    reason: str = "InvalidSpec"


UPDATE_CASES = [
    UpdateCase("output-to-another-runs-checkpoints", "operator",
               ("spec.output.s3Uri", f"s3://{BUCKET}/runs/h-upd-peer/", "h-upd-peer"),
               lambda s: {"output": {"s3Uri": f"s3://{BUCKET}/runs/h-upd-peer/"}},
               reason="StorageRootInUse"),
    UpdateCase("output-into-own-checkpoints", "operator",
               ("spec.output.s3Uri", "lie neither inside nor around it"),
               lambda s: {"output": {"s3Uri": s["checkpoints"]["s3Uri"] + "export/"}}),
    UpdateCase("output-with-dotdot", "operator",
               ("spec.output.s3Uri", "'..' segments are not allowed"),
               lambda s: {"output": {"s3Uri": f"s3://{BUCKET}/models/../runs/h-upd/"}}),
    UpdateCase("queue-name-not-a-label", "admission", ("spec.runtime.kueueQueueName",),
               lambda s: {"runtime": {"kueueQueueName": "not a label!"}}),
    UpdateCase("image-with-spaces", "operator",
               ("spec.runtime.images.tools", "is not a container image reference"),
               lambda s: {"runtime": {"images": {"tools": "ghcr.io/evil/tools :1"}}}),
    UpdateCase("missing-secret", "operator",
               ("spec.runtime.hfTokenSecretRef.name", "Secret 'no-such-token' does not exist"),
               lambda s: {"runtime": {"hfTokenSecretRef": {"name": "no-such-token",
                                                           "key": "t"}}},
               reason="SecretNotFound"),
    UpdateCase("system-priority-class", "operator",
               ("spec.runtime.priorityClassName", "is a system priority class"),
               lambda s: {"runtime": {"priorityClassName": "system-cluster-critical"}},
               reason="SystemPriorityClass"),
    UpdateCase("node-selector-bad-key", "operator",
               ("spec.runtime.nodeSelector", "the API server rejects the training pod template"),
               lambda s: {"runtime": {"nodeSelector": {"bad key!": "x"}}}),
    UpdateCase("memory-dot", "admission",
               ("spec.runtime.toolsResources.memory", "must be a Kubernetes quantity"),
               lambda s: {"runtime": {"toolsResources": {"memory": "."}}}),
    UpdateCase("output-local-path", "admission", ("output.s3Uri must be an s3://bucket",),
               lambda s: {"output": {"s3Uri": "/etc/"}}),
    UpdateCase("zero-attempts", "admission",
               ("spec.resiliency.maxAttempts", "greater than or equal to 1"),
               lambda s: {"resiliency": {"maxAttempts": 0}}),
    UpdateCase("model-changed", "admission", ("spec.model is immutable",),
               lambda s: {"model": {"source": f"s3://{BUCKET}/models/other/"}}),
]  # fmt: skip


def undo(change: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that puts back what `change` changed in `original`."""
    out: dict[str, Any] = {}
    for key, value in change.items():
        if key not in original:
            out[key] = None
        elif isinstance(value, dict) and isinstance(original[key], dict):
            out[key] = undo(value, original[key])
        else:
            out[key] = original[key]
    return out


def spec_accepted(status: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == "SpecAccepted"), {})


def training_run(runs: Runs, name: str, **changes: Any) -> dict[str, Any]:
    """A run in Training on one trn1 node (the cluster has four: the runs of this module fit
    side by side)."""
    changes.setdefault("training__nodes", 1)
    body = build(Case(name, "operator", ()), name)
    for dotted, value in changes.items():
        node = body["spec"]
        *path, last = dotted.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    runs.create(body)
    runs.wait_phase(name, "Training", timeout=120)
    return body


@pytest.fixture(scope="module")
def updated(hostile: Runs) -> Iterator[dict[str, Any]]:
    """A peer run (older, with children) and the run whose updates the table tries."""
    training_run(hostile, "h-upd-peer")
    yield training_run(hostile, "h-upd")
    hostile.delete("h-upd")
    hostile.delete("h-upd-peer")


@pytest.mark.parametrize("case", UPDATE_CASES, ids=[c.id for c in UPDATE_CASES])
def test_a_refused_update_changes_nothing_and_is_reported_naming_the_field(
    case: UpdateCase, hostile: Runs, updated: dict[str, Any]
) -> None:
    name = "h-upd"
    before = hostile.get(name) or {}
    children = {o["metadata"]["name"]: o["metadata"]["uid"] for o in
                hostile.jobs(name) + hostile.pytorchjobs(name)}  # fmt: skip
    change = case.change(before["spec"])
    if case.where == "admission":
        with pytest.raises(ApiError) as err:
            hostile.patch_spec(name, change)
        assert err.value.status in (400, 422), err.value
        for text in case.expect:
            assert text in str(err.value), f"{text!r} not in {err.value}"
        assert (hostile.get(name) or {})["metadata"]["generation"] == before["metadata"][
            "generation"
        ]
        return
    hostile.patch_spec(name, change)
    generation = (hostile.get(name) or {})["metadata"]["generation"]
    status = hostile.wait(
        name,
        lambda s: (
            spec_accepted(s).get("observedGeneration") == generation
            and spec_accepted(s).get("status") == "False"
        ),
        timeout=60,
        what=f"SpecAccepted=False for generation {generation}",
    )
    cond = spec_accepted(status)
    assert cond["reason"] == case.reason, cond
    for text in case.expect:
        assert text in cond["message"], f"{text!r} not in {cond['message']}"
    assert (
        f"generation {generation} is refused, the run goes on with generation" in (cond["message"])
    )
    assert status["phase"] == "Training" and status["attempt"] == 1
    assert status["acceptedSpec"]["generation"] < generation
    rejected = [e for e in hostile.events(name) if e["reason"] == "SpecRejected"]
    assert any(case.expect[0] in e["message"] and e["type"] == "Warning" for e in rejected)
    after = {o["metadata"]["name"]: o["metadata"]["uid"] for o in
             hostile.jobs(name) + hostile.pytorchjobs(name)}  # fmt: skip
    assert after == children, "a refused update changed the children"
    hostile.patch_spec(name, undo(change, before["spec"]))
    hostile.wait(
        name,
        lambda s: (
            spec_accepted(s).get("status") == "True"
            and s["acceptedSpec"]["generation"] == s.get("observedGeneration") > generation
        ),
        timeout=60,
        what="the undone update accepted again",
    )


def test_an_accepted_update_is_recorded_with_its_generation(
    hostile: Runs, updated: dict[str, Any]
) -> None:
    name = "h-upd"
    hostile.patch_spec(name, {"resiliency": {"maxAttempts": 5}})
    generation = (hostile.get(name) or {})["metadata"]["generation"]
    status = hostile.wait(
        name,
        lambda s: (s.get("acceptedSpec") or {}).get("generation") == generation,
        timeout=60,
        what=f"generation {generation} accepted",
    )
    assert spec_accepted(status)["status"] == "True"
    assert status["acceptedSpec"]["spec"]["resiliency"]["maxAttempts"] == 5
    assert status["acceptedSpec"]["digest"].startswith("sha256:")
    assert "model" not in status["acceptedSpec"]["spec"]  # immutable sections are not copied


# -- round two: status is derived, not trusted (reconcile/trust.py) --------------------------


def patch_status(runs: Runs, name: str, status: dict[str, Any]) -> None:
    runs.api.patch(runs.path(name) + "/status", {"status": status})


def test_a_huge_attempt_number_in_the_status_is_refused_by_the_api_server(
    hostile: Runs, updated: dict[str, Any]
) -> None:
    with pytest.raises(ApiError) as err:
        patch_status(hostile, "h-upd", {"attempt": 10**9})
    assert err.value.status == 422 and "status.attempt" in str(err.value), err.value
    assert hostile.status("h-upd")["attempt"] == 1


def test_a_hand_written_attempt_or_phase_is_repaired_from_the_children(
    hostile: Runs, updated: dict[str, Any]
) -> None:
    name = "h-upd"
    patch_status(hostile, name, {"attempt": 0})
    hostile.wait(name, lambda s: s.get("attempt") == 1, timeout=30, what="attempt back to 1")
    patch_status(hostile, name, {"phase": "Succeeded"})
    status = hostile.wait(
        name, lambda s: s.get("phase") == "Training", timeout=30, what="phase back to Training"
    )
    assert status["attempt"] == 1 and status["children"]["train"] == "h-upd-train-1"
    repaired = [e["message"] for e in hostile.events(name) if e["reason"] == "StatusRepaired"]
    assert any("status.phase Succeeded was not written by the operator" in m for m in repaired)
    assert [p["metadata"]["name"] for p in hostile.pytorchjobs(name)] == ["h-upd-train-1"]


# -- round two: the documented ways to revive a failed run (docs/api.md) ---------------------


def fail_attempt(runs: Runs, name: str, attempt: int) -> None:
    pods = runs.training_pods(name, attempt, count=1, timeout=90)
    runs.finish_pod(pods[0]["metadata"]["name"], ok=False, exit_code=3)


def test_raising_max_attempts_continues_a_run_that_used_them_all(hostile: Runs) -> None:
    name = "h-revive-attempts"
    training_run(hostile, name, resiliency__maxAttempts=1)
    fail_attempt(hostile, name, 1)
    status = hostile.wait_phase(name, "Failed", timeout=60)
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == (
        "MaxAttemptsExceeded"
    )
    hostile.patch_spec(name, {"resiliency": {"maxAttempts": 2}})
    status = hostile.wait(
        name,
        lambda s: s.get("phase") == "Training" and s.get("children", {}).get("train"),
        timeout=90,
        what="attempt 2 after raising maxAttempts",
        fail_fast=False,
    )
    assert status["attempt"] == 2 and status["children"]["train"] == f"{name}-train-2"
    assert "Revived" in hostile.event_reasons(name)
    hostile.training_pods(name, 2, count=1, timeout=60)
    hostile.delete(name)


def test_fixing_a_node_selector_and_raising_max_attempts_continues_the_run(
    hostile: Runs,
) -> None:
    name = "h-revive-selector"
    body = build(Case(name, "operator", ()), name)
    body["spec"]["training"]["nodes"] = 1
    body["spec"]["resiliency"].update(maxAttempts=1, pendingTimeoutSeconds=10)
    body["spec"]["runtime"]["nodeSelector"] = {"cpt.dev/no-such-pool": "x"}
    hostile.create(body)
    status = hostile.wait_phase(name, "Failed", timeout=120)
    assert "PendingTimeout" in status["message"]
    hostile.patch_spec(
        name,
        {"runtime": {"nodeSelector": {"cpt.dev/no-such-pool": None}},
         "resiliency": {"maxAttempts": 2, "pendingTimeoutSeconds": 1800}},
    )  # fmt: skip
    hostile.wait(
        name,
        lambda s: s.get("attempt") == 2 and s.get("phase") == "Training",
        timeout=90,
        what="attempt 2 with the fixed selector",
        fail_fast=False,
    )
    (ptj,) = [j for j in hostile.pytorchjobs(name) if j["metadata"]["name"] == f"{name}-train-2"]
    selector = ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["nodeSelector"]
    assert "cpt.dev/no-such-pool" not in selector
    hostile.training_pods(name, 2, count=1, timeout=60)
    hostile.delete(name)


def test_a_run_refused_for_a_missing_secret_is_planned_again_after_an_edit(
    hostile: Runs,
) -> None:
    name = "h-revive-secret"
    body = build(Case(name, "operator", ()), name)
    body["spec"]["training"]["nodes"] = 1
    body["spec"]["runtime"]["hfTokenSecretRef"] = {"name": "h-token-later", "key": "token"}
    hostile.create(body)
    status = hostile.wait_phase(name, "Failed", timeout=60)
    assert "Secret 'h-token-later' does not exist" in status["message"]
    assert hostile.child_names(name) == []
    hostile.api.create(
        f"/api/v1/namespaces/{hostile.ns}/secrets",
        {"metadata": {"name": "h-token-now"}, "stringData": {"token": "not-a-real-token"}},
    )
    hostile.patch_spec(name, {"runtime": {"hfTokenSecretRef": {"name": "h-token-now"}}})
    hostile.wait(
        name,
        lambda s: s.get("phase") not in ("Failed", "Pending", "Planning"),
        timeout=60,
        what="planned again and started",
        fail_fast=False,
    )
    assert "Revived" in hostile.event_reasons(name)
    hostile.delete(name)
