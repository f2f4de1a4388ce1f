"""The generated CRD on a real API server: it is accepted, valid examples are admitted with
their defaults materialized, schema- and CEL-invalid specs are rejected with our messages,
the immutable sections stay immutable, and status fields survive (not pruned)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_operator.api.crd import CRD_FILE
from fixtures import specedit
from fixtures.cluster import Cluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUN: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "run.yaml").read_text())
CRD_NAME = "continualpretrains.cpt.dev"


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> Cluster:
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=cpt-tests",
        "-f",
        str(ROOT / CRD_FILE),
    )
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return cluster


def edit(**changes: Any) -> dict[str, Any]:
    """run.yaml with ``a__b=value`` set (``...`` deletes)."""
    return specedit.edit(RUN, **changes)


def apply(cluster: Cluster, namespace: str, doc: dict[str, Any], *, dry_run: bool = True) -> Any:
    args = ["apply", "-n", namespace, "-f", "-"]
    if dry_run:
        args.insert(1, "--dry-run=server")
    return cluster.kubectl(*args, input=yaml.safe_dump(doc), check=False)


DOMAIN = {"uri": "s3://corpus/domain/", "role": "domain"}
REPLAY = {"uri": "s3://corpus/replay/", "role": "replay"}

INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "a re-warming start above the peak",
        edit(spec__training__optimizer={"lr": 1e-4, "warmupStartLr": 2e-4}),
        "warmupStartLr must not exceed lr",
    ),
    (
        "a weight on one source only",
        edit(spec__data__sources=[DOMAIN | {"weight": 0.9}, REPLAY]),
        "set weight on every data source or on none",
    ),
    (
        "only zero weights",
        edit(spec__data__sources=[DOMAIN | {"weight": 0}, REPLAY | {"weight": 0}]),
        "at least one data source weight must be positive",
    ),
    (
        "a repeated role",
        edit(spec__data__sources=[DOMAIN, REPLAY | {"role": "domain"}]),
        "data source roles must be unique",
    ),
    (
        "a negative weight",
        edit(spec__data__sources=[DOMAIN | {"weight": -1}, REPLAY | {"weight": 1}]),
        "spec.data.sources[0].weight: Invalid value",
    ),
    (
        "an evaluation every 0 steps",
        edit(spec__training__evalEverySteps=0),
        "spec.training.evalEverySteps: Invalid value: 0: spec.training.evalEverySteps in body "
        "should be greater than or equal to 1",
    ),
    # schema
    (
        "zero nodes",
        edit(spec__training__nodes=0),
        "spec.training.nodes: Invalid value: 0: spec.training.nodes in body should be greater than "
        "or equal to 1",
    ),
    (
        "an unknown instance type",
        edit(spec__training__instanceType="trn9.huge"),
        'spec.training.instanceType: Unsupported value: "trn9.huge"',
    ),
    (
        "a misspelt field",
        edit(spec__training__tensorparallel=2),
        'unknown field "spec.training.tensorparallel"',
    ),
    (
        "half the data held out",
        edit(spec__data__heldOutFraction=0.5),
        'spec.data.heldOutFraction: Invalid value: "number": must be less than 0.5',
    ),
    (
        "no data sources",
        edit(spec__data__sources=[]),
        "spec.data.sources: Invalid value: 0: spec.data.sources in body should have at least 1 "
        "items",
    ),
    # CEL
    (
        "tensor x pipeline parallel not dividing the world",
        edit(spec__training__tensorParallel=3),
        'spec.training.tensorParallel: Invalid value: "object": tensorParallel x '
        "pipelineParallel must divide nodes x processesPerNode",
    ),
    (
        "global batch not a multiple of the micro batch",
        edit(spec__training__microBatchSize=3),
        'spec.training.globalBatchSize: Invalid value: "object": globalBatchSize must be a '
        "multiple of microBatchSize",
    ),
    (
        "min lr above the peak",
        edit(spec__training__optimizer__minLr=1e-3),
        'spec.training.optimizer.minLr: Invalid value: "object": minLr must not exceed lr',
    ),
    (
        "both maxSteps and maxTokens",
        edit(spec__training__maxTokens=10**9),
        'spec.training.maxSteps: Invalid value: "object": set exactly one of maxSteps or maxTokens',
    ),
    (
        "sequence parallel without tensor parallel",
        edit(spec__training__tensorParallel=1, spec__training__sequenceParallel=True),
        'spec.training.sequenceParallel: Invalid value: "object": sequenceParallel needs '
        "tensorParallel > 1",
    ),
    (
        "nxd on GPUs",
        edit(spec__training__instanceType="p5.48xlarge"),
        'spec.training.backend: Invalid value: "object": backend nxd runs on Trainium only '
        "(instanceType p5.48xlarge); use native or auto",
    ),
    (
        "a literal credential in env",
        edit(spec__training__env=[{"name": "WANDB_API_KEY", "value": "s3cr3t-v4lue"}]),
        'spec.training.env[0].value: Invalid value: "object": env WANDB_API_KEY looks like a '
        "credential: use valueFrom.secretKeyRef, never a literal value",
    ),
    (
        "an operator-owned env name",
        edit(spec__training__env=[{"name": "MASTER_PORT", "value": "1"}]),
        'spec.training.env[0].name: Invalid value: "object": env MASTER_PORT is set by the '
        "operator, the Job controller or torchrun and cannot be overridden",
    ),
    (
        "a pvc scratch without a claim",
        edit(spec__checkpoints__scratch={"type": "pvc"}),
        'spec.checkpoints.scratch.claimName: Invalid value: "object": scratch type pvc needs '
        "claimName",
    ),
    (
        "a data source with both a dataset and a uri",
        edit(spec__data__sources=[{"hfDataset": "x", "uri": "s3://bkt/x/"}]),
        'spec.data.sources[0]: Invalid value: "object": a data source needs exactly one of '
        "hfDataset or uri",
    ),
    (
        "a local checkpoint path",
        edit(spec__checkpoints__s3Uri="/local/ckpt/"),
        'spec.checkpoints.s3Uri: Invalid value: "string": checkpoints.s3Uri must be an '
        "s3://bucket/prefix/ URI (local paths work only with `cpt local`)",
    ),
    (
        "a model in another scheme",
        edit(spec__model__source="gs://bucket/llama"),
        'spec.model.source: Invalid value: "string": model.source must be '
        "hf://org/name[@revision] or s3://bucket/prefix/ (local paths work only with `cpt local`)",
    ),
    (
        "a run name too long for its children",
        edit(metadata__name="r" * 41),
        "metadata.name must be at most 40 characters: child Jobs, pods and Services are named "
        "after it",
    ),
    (
        "a run name starting with a digit",
        edit(metadata__name="70b-run"),
        "metadata.name must start with a letter and contain only lowercase letters, digits and "
        "'-' (it names Services)",
    ),
]


@pytest.mark.parametrize(("doc", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_admission_rejects_an_invalid_spec_with_our_message(
    crd: Cluster, namespace: str, doc: dict[str, Any], message: str
) -> None:
    proc = apply(crd, namespace, doc)
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr
    assert "s3cr3t-v4lue" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "name", ["run.yaml", "llama31-8b-trn1.yaml", "llama31-8b-trn2.yaml", "llama32-1b-p5.yaml"]
)
def test_the_cluster_examples_are_admitted(crd: Cluster, namespace: str, name: str) -> None:
    doc = yaml.safe_load((ROOT / "examples" / name).read_text())
    proc = apply(crd, namespace, doc)
    assert proc.returncode == 0, proc.stderr


def test_the_local_example_is_refused_in_a_cluster_for_its_local_paths(
    crd: Cluster, namespace: str
) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())
    proc = apply(crd, namespace, doc)
    assert proc.returncode != 0
    for field in (
        "spec.model.source",
        "spec.checkpoints.s3Uri",
        "spec.output.s3Uri",
        "spec.data.sources[0].uri",
    ):
        assert f"{field}: Invalid value" in proc.stderr, field


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        (edit(spec__data__heldOutFraction=0), "an integer 0 under a fractional bound"),
        (edit(spec__training__processesPerNode=None), "null is pruned, not rejected"),
        (edit(spec__training__maxSteps=..., spec__training__maxTokens=3 * 10**9), "maxTokens"),
        (edit(spec__checkpoints__scratch={"type": "pvc", "claimName": "fsx"}), "pvc scratch"),
        (
            edit(spec__data__sources=[DOMAIN | {"weight": 9}, REPLAY | {"weight": 1}]),
            "integer weights, roles",
        ),
        (
            edit(spec__data__sources=[DOMAIN | {"weight": 1}, REPLAY | {"weight": 0}]),
            "an evaluation-only source",
        ),
        (
            edit(
                spec__training__optimizer={
                    "lr": 1e-4,
                    "minLr": 1e-5,
                    "warmupStartLr": 1e-5,
                    "decayStyle": "wsd",
                    "cooldownFraction": 0.1,
                }
            ),
            "re-warmed wsd",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_valid_edge_cases_are_admitted(
    crd: Cluster, namespace: str, doc: dict[str, Any], why: str
) -> None:
    proc = apply(crd, namespace, doc)
    assert proc.returncode == 0, f"{why}: {proc.stderr}"


def _get(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "continualpretrain", name, "-n", namespace, "-o", "json")
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def test_defaults_are_materialized_with_the_pinned_images(crd: Cluster, namespace: str) -> None:
    assert apply(crd, namespace, RUN, dry_run=False).returncode == 0
    spec = _get(crd, namespace, RUN["metadata"]["name"])["spec"]
    assert spec["runtime"]["images"]["trainerNeuron"] == "ghcr.io/cpt-dev/cpt-trainer-neuron:0.1.0"
    assert spec["runtime"]["gangScheduling"] == "none"
    assert spec["resiliency"]["maxAttempts"] == 5  # given
    assert spec["training"]["optimizer"]["eps"] == 1e-8  # defaulted inside a given section
    assert spec["suspend"] is False


def test_immutable_sections_cannot_change_but_runtime_and_suspend_can(
    crd: Cluster, namespace: str
) -> None:
    name = RUN["metadata"]["name"]
    assert apply(crd, namespace, RUN, dry_run=False).returncode == 0
    for section, patch in [
        ("training", {"spec": {"training": {"nodes": 16}}}),
        ("model", {"spec": {"model": {"source": "hf://meta-llama/Llama-3.1-70B"}}}),
        ("data", {"spec": {"data": {"shards": 4}}}),
        ("checkpoints", {"spec": {"checkpoints": {"everySteps": 50}}}),
    ]:
        proc = crd.kubectl(
            "patch",
            "continualpretrain",
            name,
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps(patch),
            check=False,
        )
        assert proc.returncode != 0, section
        assert (
            f'spec.{section}: Invalid value: "object": spec.{section} is immutable once the '
            "run exists: to change it, create a new ContinualPretrain"
        ) in proc.stderr
    for patch in [
        {"spec": {"suspend": True}},
        {"spec": {"runtime": {"priorityClassName": "training-high"}}},
        {"spec": {"resiliency": {"maxAttempts": 9}}},
    ]:
        crd.kubectl(
            "patch",
            "continualpretrain",
            name,
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps(patch),
        )
    spec = _get(crd, namespace, name)["spec"]
    assert spec["suspend"] is True and spec["resiliency"]["maxAttempts"] == 9


def test_status_is_kept_and_feeds_the_printer_columns(crd: Cluster, namespace: str) -> None:
    name = RUN["metadata"]["name"]
    assert apply(crd, namespace, RUN, dry_run=False).returncode == 0
    status = {
        "status": {
            "phase": "Training",
            "attempt": 2,
            "observedGeneration": 1,
            "progress": {
                "step": 120,
                "maxSteps": 1500,
                "stepOfMax": "120/1500",
                "loss": 1.87,
                "tokensPerSec": 52000.5,
                "mfuPercent": 24.1,
                "updatedAt": "2026-01-02T03:04:05Z",
            },
            "plan": {
                "backend": "nxd",
                "instanceType": "trn1.32xlarge",
                "nodes": 32,
                "processesPerNode": 32,
                "worldSize": 1024,
                "dataParallel": 16,
                "tensorParallel": 8,
                "pipelineParallel": 8,
                "microBatchSize": 1,
                "gradAccumSteps": 32,
                "tokensPerStep": 2097152,
                "maxSteps": 1500,
                "totalTokens": 3145728000,
                "params": 68976648192,
                "memoryPerDeviceGib": 8.69,
                "warnings": ["w"],
            },
            "conditions": [
                {
                    "type": "Training",
                    "status": "True",
                    "reason": "Running",
                    "message": "",
                    "lastTransitionTime": "2026-01-02T03:04:05Z",
                }
            ],
            "children": {"train": f"{name}-train-2"},
            "kopf": {"progress": {"reconcile": {"started": "2026-01-02T03:04:05Z"}}},
        }
    }
    crd.kubectl(
        "patch",
        "continualpretrain",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    got = _get(crd, namespace, name)["status"]
    assert got["progress"]["stepOfMax"] == "120/1500"
    assert got["plan"]["dataParallel"] == 16
    assert got["children"]["train"] == f"{name}-train-2"
    assert got["kopf"] == status["status"]["kopf"]  # preserved, not pruned
    table = crd.kubectl("get", "cpt", name, "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "STEP", "ATTEMPT", "LOSS", "TOKENS/S", "MFU%", "AGE"]
    assert row.split()[:7] == [name, "Training", "120/1500", "2", "1.87", "52000.5", "24.1"]


# -- one parser, one set of rules (issue #18): cpt plan accepts what the API server accepts ----


def _plan_accepts(text: str, tmp: Path) -> bool:
    """Whether `cpt plan`'s reading of the file and its schema validation accept it (planner
    arithmetic, which the API server does not do, is left out)."""
    from cpt_operator.api.models import parse_spec
    from cpt_operator.api.planner import load_run

    path = tmp / "run.yaml"
    path.write_text(text)
    try:
        parse_spec(load_run(path)["spec"])
    except ValueError:
        return False
    return True


PARITY = [
    ("cpu 500m", edit(spec__runtime__toolsResources={"cpu": "500m"}), True),
    ("memory 64Gi", edit(spec__runtime__toolsResources={"memory": "64Gi"}), True),
    ("memory 1e3", edit(spec__runtime__toolsResources={"memory": "1e3"}), True),
    ("cpu .5", edit(spec__runtime__toolsResources={"cpu": ".5"}), True),
    ("cpu .", edit(spec__runtime__toolsResources={"cpu": "."}), False),
    ("memory 1e400", edit(spec__runtime__toolsResources={"memory": "1e400"}), False),
    ("memory -1Gi", edit(spec__runtime__toolsResources={"memory": "-1Gi"}), False),
    ("memory 4GB", edit(spec__runtime__toolsResources={"memory": "4GB"}), False),
    ("sizeLimit 8Ei", edit(spec__checkpoints__scratch={"sizeLimit": "8Ei"}), False),
    ("sizeLimit 7Ei", edit(spec__checkpoints__scratch={"sizeLimit": "7Ei"}), True),
    ("maxSteps '10'", edit(spec__training__maxSteps="10"), False),
    ("compile 'yes'", edit(spec__training__compile="yes"), False),
    ("suspend 1", edit(spec__suspend=1), False),
    ("nodes 2.5", edit(spec__training__nodes=2.5), False),
    ("env twice", edit(spec__training__env=[{"name": "A", "value": "1"},
                                            {"name": "A", "value": "2"}]), False),
    ("JOB_COMPLETION_INDEX", edit(spec__training__env=[{"name": "JOB_COMPLETION_INDEX",
                                                        "value": "1"}]), False),
    ("extra compiler flags", edit(spec__training__env=[{"name": "CPT_EXTRA_NEURON_CC_FLAGS",
                                                        "value": "-O1"}]), True),
    ("mountPath ..", edit(spec__checkpoints__scratch={"mountPath": "/a/../b"}), False),
    ("queue not a label", edit(spec__runtime__kueueQueueName="a b"), False),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "ok"), [c[1:] for c in PARITY], ids=[c[0] for c in PARITY])
def test_the_api_server_and_cpt_plan_accept_the_same_specs(
    crd: Cluster, namespace: str, doc: dict[str, Any], ok: bool, tmp_path: Path
) -> None:
    text = json.dumps(doc)  # JSON is YAML, and keeps "1e3" a string for both readers
    proc = crd.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=text,
                       check=False)  # fmt: skip
    assert (proc.returncode == 0) is ok, proc.stderr
    assert _plan_accepts(text, tmp_path) is ok


RAW = yaml.safe_dump(edit(spec__suspend=False))
WITH_MEMORY = yaml.safe_dump(edit(spec__runtime__toolsResources={"memory": "MEMORY"}))
TEXTS = [
    ("unquoted 1e3 is a number in both", WITH_MEMORY.replace("MEMORY", "1e3"), False),
    ("quoted 1e3 is a quantity in both", WITH_MEMORY.replace("MEMORY", "'1e3'"), True),
    ("unquoted no is a boolean in both", RAW.replace("suspend: false", "suspend: no", 1), True),
    ("quoted no is a string in both", RAW.replace("suspend: false", "suspend: 'no'", 1), False),
]  # fmt: skip


@pytest.mark.parametrize(("text", "ok"), [c[1:] for c in TEXTS], ids=[c[0] for c in TEXTS])
def test_the_api_server_and_cpt_plan_read_the_same_yaml(
    crd: Cluster, namespace: str, text: str, ok: bool, tmp_path: Path
) -> None:
    proc = crd.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=text,
                       check=False)  # fmt: skip
    assert (proc.returncode == 0) is ok, proc.stderr
    assert _plan_accepts(text, tmp_path) is ok


def test_a_duplicate_key_is_refused_by_cpt_plan_where_kubectl_silently_keeps_one(
    crd: Cluster, namespace: str, tmp_path: Path
) -> None:
    """Stricter than kubectl on purpose: a file that says two things is refused (kubectl's
    YAML-to-JSON step keeps the last value, even with --validate=strict)."""
    text = RAW.replace("spec:\n", "spec:\n  suspend: true\n", 1)
    assert "suspend: false" in text  # the run's own key comes later in the mapping
    proc = crd.kubectl("create", "--dry-run=server", "--validate=strict", "-n", namespace,
                       "-f", "-", "-o", "json", input=text, check=False)  # fmt: skip
    assert proc.returncode == 0 and json.loads(proc.stdout)["spec"]["suspend"] is False
    assert not _plan_accepts(text, tmp_path)
