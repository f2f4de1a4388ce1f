"""The ContinualPretrain spec/status models: parsing, defaults, derived values, the rules they
enforce themselves, and that they stay in step with the workload's stage configs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import ValidationError

from cpt_operator.api.models import (
    DEFAULT_IMAGES,
    CheckpointsSpec,
    ContinualPretrain,
    ContinualPretrainSpec,
    ContinualPretrainStatus,
    DataSpec,
    EnvVar,
    FieldErrors,
    Phase,
    ScratchSpec,
    TrainingSpec,
    join_uri,
)
from cpt_training.config import CheckpointPolicy, TokenizeStage, TrainStage

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return doc


def spec(**training: Any) -> dict[str, Any]:
    base = copy.deepcopy(load("run.yaml")["spec"])
    base["training"].update(training)
    return base


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_parses_as_a_whole_object(name: str) -> None:
    obj = ContinualPretrain.model_validate(load(name))
    assert obj.metadata.name == load(name)["metadata"]["name"]


def test_the_seed_run_example_carries_the_blog_hyperparameters() -> None:
    s = ContinualPretrainSpec.model_validate(load("run.yaml")["spec"])
    t, o = s.training, s.training.optimizer
    assert (t.nodes, t.tensor_parallel, t.pipeline_parallel) == (32, 8, 8)
    assert (t.global_batch_size, t.micro_batch_size, s.data.block_size) == (512, 1, 4096)
    assert (o.lr, o.min_lr, o.warmup_steps, o.beta1, o.beta2, o.weight_decay) == (
        1.5e-4,
        1e-5,
        2000,
        0.9,
        0.95,
        0.1,
    )
    assert (t.max_steps, t.zero1, s.checkpoints.every_steps, s.checkpoints.keep) == (
        1500,
        True,
        10,
        1,
    )
    assert s.data.sources[0].hf_dataset == "wikicorpus"
    assert s.data.sources[0].hf_config == "raw_en"


def test_wire_format_is_camel_case_and_round_trips() -> None:
    s = ContinualPretrainSpec.model_validate(load("run.yaml")["spec"])
    wire = s.to_wire()
    assert wire["training"]["tensorParallel"] == 8
    assert wire["checkpoints"]["s3Uri"].startswith("s3://")
    assert ContinualPretrainSpec.model_validate(wire) == s


def test_tokenized_data_defaults_under_the_checkpoint_root() -> None:
    s = ContinualPretrainSpec.model_validate(load("run.yaml")["spec"])
    assert s.data_uri() == "s3://my-bucket/cpt/llama2-70b-wikicorpus/checkpoints/data/"
    explicit = spec()
    explicit["data"]["tokenizedUri"] = "s3://other-bucket/tok/"
    assert ContinualPretrainSpec.model_validate(explicit).data_uri() == "s3://other-bucket/tok/"


def test_the_tokenizer_defaults_to_the_model() -> None:
    s = ContinualPretrainSpec.model_validate(load("run.yaml")["spec"])
    assert s.tokenizer_uri() == "hf://meta-llama/Llama-2-70b-hf"


def test_join_uri_uses_single_slashes() -> None:
    assert join_uri("s3://b/x/", "/data/") == "s3://b/x/data/"
    assert join_uri(".demo/run", "data/") == ".demo/run/data/"


@pytest.mark.parametrize(
    ("instance", "backend"),
    [
        ("trn1.32xlarge", "nxd"),
        ("trn1n.32xlarge", "nxd"),
        ("trn1.2xlarge", "nxd"),
        ("trn2.48xlarge", "native"),
        ("p5.48xlarge", "native"),
        ("local-cpu", "native"),
    ],
)
def test_backend_auto_is_nxd_on_trn1_and_native_elsewhere(instance: str, backend: str) -> None:
    t = TrainingSpec.model_validate({"instanceType": instance, "maxSteps": 1, "globalBatchSize": 8})
    assert t.resolved_backend() == backend


def test_processes_per_node_come_from_the_instance_type_unless_set() -> None:
    t = TrainingSpec.model_validate({"instanceType": "trn1.32xlarge", "nodes": 2, "maxSteps": 1})
    assert (t.resolved_processes_per_node(), t.world_size()) == (32, 64)
    t = TrainingSpec.model_validate(
        {"instanceType": "local-cpu", "processesPerNode": 3, "maxSteps": 1, "globalBatchSize": 3}
    )
    assert (t.resolved_processes_per_node(), t.world_size()) == (3, 3)


def test_max_tokens_rounds_up_to_whole_steps() -> None:
    s = spec(maxTokens=2_097_153)
    del s["training"]["maxSteps"]
    assert ContinualPretrainSpec.model_validate(s).max_steps() == 2  # 2,097,152 per step


def _problems(exc: pytest.ExceptionInfo[ValidationError]) -> list[tuple[str, str]]:
    out = []
    for err in exc.value.errors():
        cause = (err.get("ctx") or {}).get("error")
        assert isinstance(cause, FieldErrors), err
        out += cause.problems
    return out


def test_training_rules_are_collected_with_their_fields() -> None:
    with pytest.raises(ValidationError) as exc:
        TrainingSpec.model_validate(
            {
                "nodes": 1,
                "tensorParallel": 3,
                "globalBatchSize": 10,
                "microBatchSize": 4,
                "sequenceParallel": False,
                "maxSteps": 1,
                "maxTokens": 5,
            }
        )
    assert _problems(exc) == [
        ("maxSteps", "set exactly one of maxSteps or maxTokens"),
        (
            "globalBatchSize",
            "globalBatchSize must be a multiple of microBatchSize: 10 is not a multiple of 4",
        ),
        (
            "tensorParallel",
            "tensorParallel x pipelineParallel must divide nodes x processesPerNode: "
            "3 x 1 = 3 does not divide 1 x 32 = 32",
        ),
    ]


def test_a_literal_credential_in_env_is_rejected_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as exc:
        EnvVar.model_validate({"name": "WANDB_API_KEY", "value": "s3cr3t-value"})
    assert "s3cr3t-value" not in str(_problems(exc))
    assert _problems(exc) == [
        (
            "value",
            "env WANDB_API_KEY looks like a credential: use valueFrom.secretKeyRef, never a "
            "literal value",
        )
    ]


def test_a_credential_from_a_secret_is_fine() -> None:
    env = EnvVar.model_validate(
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "k"}}}
    )
    assert env.value_from is not None and env.value_from.secret_key_ref is not None


@pytest.mark.parametrize("name", ["MASTER_ADDR", "CPT_STAGE_CONFIG", "PET_NNODES", "RANK"])
def test_operator_owned_env_names_are_rejected(name: str) -> None:
    with pytest.raises(ValidationError) as exc:
        EnvVar.model_validate({"name": name, "value": "x"})
    assert _problems(exc) == [
        (
            "name",
            f"env {name} is set by the operator, the Job controller or torchrun and cannot be "
            "overridden (docs/api.md lists the reserved names)",
        )
    ]


def test_an_ordinary_env_var_is_accepted() -> None:
    assert EnvVar.model_validate({"name": "XLA_FLAGS", "value": "-O1"}).value == "-O1"


@pytest.mark.parametrize(
    ("scratch", "problem"),
    [
        ({"type": "hostPath"}, ("path", "scratch type hostPath needs path (e.g. /local/nvme)")),
        ({"type": "pvc"}, ("claimName", "scratch type pvc needs claimName")),
        (
            {"type": "emptyDir", "path": "/x"},
            ("path", "scratch path is only used with type hostPath"),
        ),
        (
            {"type": "hostPath", "path": "/x", "claimName": "c"},
            ("claimName", "scratch claimName is only used with type pvc"),
        ),
    ],
)
def test_scratch_needs_exactly_its_own_fields(
    scratch: dict[str, Any], problem: tuple[str, str]
) -> None:
    with pytest.raises(ValidationError) as exc:
        ScratchSpec.model_validate(scratch)
    assert _problems(exc) == [problem]


@pytest.mark.parametrize(
    "scratch",
    [
        {},
        {"type": "hostPath", "path": "/local/nvme"},
        {"type": "pvc", "claimName": "fsx"},
        {"type": "emptyDir", "sizeLimit": "500Gi"},
    ],
)
def test_valid_scratch_kinds_are_accepted(scratch: dict[str, Any]) -> None:
    ScratchSpec.model_validate(scratch)


@pytest.mark.parametrize(
    "uri", ["s3://my-bucket/ckpt/", "/abs/path", ".demo/run/ckpt/", "file:///tmp/x"]
)
def test_storage_fields_take_s3_or_a_local_path(uri: str) -> None:
    assert CheckpointsSpec.model_validate({"s3Uri": uri}).s3_uri == uri


@pytest.mark.parametrize("uri", ["gs://bucket/x", "hf://org/name", "s3://A_B/x", "s3://b/"])
def test_other_schemes_and_bad_buckets_are_not_storage(uri: str) -> None:
    with pytest.raises(ValidationError, match="is not a storage URI"):
        CheckpointsSpec.model_validate({"s3Uri": uri})


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ContinualPretrainSpec.model_validate({**spec(), "trainig": {}})


def test_runtime_defaults_pin_the_images() -> None:
    s = ContinualPretrainSpec.model_validate(load("run.yaml")["spec"])
    assert s.runtime.images.trainer_neuron == DEFAULT_IMAGES["trainer_neuron"]
    assert all(img.endswith(":0.1.0") for img in DEFAULT_IMAGES.values())


def test_spec_literals_are_the_trainers_literals() -> None:
    """The spec and the train stage config must accept the same values."""
    fields = TrainingSpec.model_fields
    stage = TrainStage.model_fields
    for name in ("precision", "activation_checkpointing"):
        assert get_args(fields[name].annotation) == get_args(stage[name].annotation), name
    assert set(get_args(fields["backend"].annotation)) - {"auto"} == set(
        get_args(stage["backend"].annotation)
    )
    assert fields["activation_checkpointing"].default == stage["activation_checkpointing"].default


def test_spec_defaults_match_the_stage_configs_they_feed() -> None:
    ck, pol = CheckpointsSpec.model_fields, CheckpointPolicy.model_fields
    for name in ("every_steps", "keep", "async_save"):
        assert ck[name].default == pol[name].default, name
    data, tok = DataSpec.model_fields, TokenizeStage.model_fields
    for name in ("text_field", "block_size", "packing", "held_out_fraction"):
        assert data[name].default == tok[name].default, name
    assert get_args(data["packing"].annotation) == get_args(tok["packing"].annotation)


def test_status_tolerates_kopf_and_unknown_fields() -> None:
    status = ContinualPretrainStatus.model_validate(
        {
            "phase": "Training",
            "attempt": 2,
            "kopf": {"progress": {"reconcile": {"retries": 1}}},
            "somethingNewer": True,
            "progress": {"step": 10, "maxSteps": 1500, "stepOfMax": "10/1500", "loss": 2.1},
            "conditions": [
                {
                    "type": "Training",
                    "status": "True",
                    "reason": "Running",
                    "message": "",
                    "lastTransitionTime": "2026-01-02T03:04:05Z",
                }
            ],
        }
    )
    assert status.phase is Phase.TRAINING
    wire = status.to_wire()
    assert wire["progress"]["stepOfMax"] == "10/1500"
    assert wire["conditions"][0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert "somethingNewer" not in wire


def test_phases_are_the_documented_set() -> None:
    assert [p.value for p in Phase] == [
        "Pending",
        "Planning",
        "Preflight",
        "Tokenizing",
        "PreparingWeights",
        "Precompiling",
        "Training",
        "Converting",
        "Succeeded",
        "Failed",
        "Suspended",
    ]


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("llama2-70b-wikicorpus", True),
        ("a" * 40, True),
        ("a" * 41, False),
        ("1run", False),
        ("Run", False),
        ("run-", False),
    ],
)
def test_run_names_are_short_dns_labels(name: str, ok: bool) -> None:
    obj = {**load("run.yaml"), "metadata": {"name": name}}
    if ok:
        ContinualPretrain.model_validate(obj)
    else:
        with pytest.raises(ValidationError):
            ContinualPretrain.model_validate(obj)
