"""ContinualPretrain (cpt.dev/v1alpha1) spec and status models.

The CRD schema is generated from these models (``cpt_operator.api.crd``), so they are the single
definition of the API. Sub-models shared with the workload (data sources, optimizer, parallelism)
come from ``cpt_training.config``. Python validation here mirrors the CRD's schema and CEL rules so
``cpt plan`` / ``cpt local`` reject the same specs the API server does; checks that need
arithmetic over the model shape (memory, heads vs TP) live in the planner.

Storage fields are named ``s3Uri`` because in a cluster they must be S3 (the CRD enforces it);
the Python models also accept a local path so the same file runs under ``cpt local``.

The names, limits and field types live in ``fields.py``, the status models in
``status_models.py``, the runtime section and Secret references in ``runtime_models.py``; all
are re-exported here.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from cpt_operator.api.fields import (
    API_VERSION,
    CATEGORIES,
    DEFAULT_IMAGE_TAG,
    DEFAULT_IMAGES,
    DEFAULT_MAX_EXCLUDED_NODES,
    DOT_SEGMENT_PATTERN,
    ENV_NAME_PATTERN,
    EXTRA_NEURON_CC_FLAGS_ENV,
    GROUP,
    HF_TOKEN_ENV,
    KIND,
    MAX_EXCLUDED_NODES_LIMIT,
    MAX_NAME_LENGTH,
    MSG_CREDENTIAL_ENV,
    MSG_DOT_SEGMENTS,
    MSG_DUPLICATE_ENV,
    MSG_GBS_MULTIPLE,
    MSG_MP_DIVIDES_WORLD,
    MSG_RESERVED_ENV,
    NAME_MAX_LENGTH,
    NAME_PATTERN,
    PLURAL,
    RESERVED_ENV_NAMES,
    RESERVED_ENV_PREFIXES,
    S3_CREDENTIAL_ENV,
    SECRET_ENV_PATTERN,
    SHORT_NAMES,
    SINGULAR,
    URI_MAX_LENGTH,
    VERSION,
    ActivationCheckpointing,
    Backend,
    FieldErrors,
    GangScheduling,
    K8sName,
    ModelUri,
    Precision,
    Quantity,
    StorageUri,
    is_hf_uri,
    is_local_path,
    is_s3_uri,
    raise_if,
)
from cpt_operator.api.runtime_models import (
    ConfigMapKeySelector,
    ImagesSpec,
    ResiliencySpec,
    ResourceRequests,
    RuntimeSpec,
    S3CredentialsSecretRef,
    SecretKeySelector,
    Toleration,
    credential_env_names,
)
from cpt_operator.api.status_models import (
    ACCEPTED_SPEC_MAX_BYTES,
    EVAL_SUMMARY_MAX,
    MAX_ATTEMPTS_LIMIT,
    TERMINAL_PHASES,
    AcceptedSpec,
    AttemptStatus,
    CheckpointStatus,
    ChildrenStatus,
    Condition,
    ConditionType,
    ContinualPretrainStatus,
    EvalStatus,
    ExcludedNode,
    Phase,
    PlanSummary,
    PreflightStatus,
    ProgressStatus,
    SourceEvalStatus,
    StatusModel,
)
from cpt_training.config import (
    CamelModel,
    DataSource,
    OptimizerConfig,
    ParallelismConfig,
    mixture_problems,
)
from cpt_training.flops import INSTANCE_TYPES, InstanceTypeName, instance_type

# ---------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------


class ModelSpec(CamelModel):
    """The base model to continue pretraining."""

    source: ModelUri = Field(
        description="hf://org/name[@revision] or s3://bucket/prefix/ holding a Hugging Face "
        "model (config.json + safetensors). A local directory works with `cpt local`."
    )
    config_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys merged over the model's config.json (e.g. rope_scaling, or the whole "
        "shape of a model the planner does not know).",
    )
    tokenizer: ModelUri | None = Field(
        default=None, description="Tokenizer source; defaults to model.source."
    )


class DataSpec(CamelModel):
    """Raw corpora and how they are tokenized and packed (the tokenize stage)."""

    sources: list[DataSource] = Field(min_length=1, max_length=32)
    text_field: str = Field(default="text", min_length=1, max_length=128)
    block_size: int = Field(
        default=4096, ge=8, le=1048576, description="Tokens per packed block = training seq len."
    )
    packing: Literal["concat"] = Field(
        default="concat",
        description="concat: documents joined with EOS and cut into blockSize blocks.",
    )
    shards: int = Field(
        default=1, ge=1, le=10000, description="Tokenize Job completions (Indexed Job)."
    )
    workers_per_shard: int = Field(
        default=1, ge=1, le=256, description="Tokenizer processes inside one shard pod."
    )
    held_out_fraction: float = Field(
        default=0.0, ge=0, lt=0.5, description="Blocks kept aside for the held-out loss."
    )
    tokenized_uri: StorageUri | None = Field(
        default=None, description="Where tokenized shards go; default <checkpoints.s3Uri>/data/."
    )

    @model_validator(mode="after")
    def _mixture(self) -> DataSpec:
        problems = mixture_problems(self.sources)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class EnvVarSource(CamelModel):
    secret_key_ref: SecretKeySelector | None = None
    config_map_key_ref: ConfigMapKeySelector | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("valueFrom needs exactly one of secretKeyRef or configMapKeyRef")
        return self


class EnvVar(CamelModel):
    """An extra environment variable for the stage containers. Never a secret value: anything
    that looks like a credential must use valueFrom.secretKeyRef."""

    name: str = Field(min_length=1, max_length=128, pattern=ENV_NAME_PATTERN)
    value: str | None = Field(default=None, max_length=4096)
    value_from: EnvVarSource | None = None

    @model_validator(mode="after")
    def _check(self) -> EnvVar:
        problems: list[tuple[str, str]] = []
        if (self.value is None) == (self.value_from is None):
            problems.append(("", f"env {self.name}: set exactly one of value or valueFrom"))
        if self.name in RESERVED_ENV_NAMES or self.name.startswith(RESERVED_ENV_PREFIXES):
            problems.append(("name", f"env {self.name} {MSG_RESERVED_ENV}"))
        if self.value is not None and re.search(SECRET_ENV_PATTERN, self.name):
            problems.append(
                (
                    "value",
                    f"env {self.name} looks like a credential: use valueFrom.secretKeyRef, "
                    "never a literal value",
                )
            )
        raise_if(problems)
        return self


class TrainingSpec(ParallelismConfig):
    """Where and how the training runs. Parallelism knobs (tensorParallel, pipelineParallel,
    zero1, sequenceParallel) are inherited from cpt_training.config.ParallelismConfig."""

    backend: Backend = Field(
        default="auto", description="auto: nxd on trn1/trn1n, native everywhere else."
    )
    instance_type: InstanceTypeName = Field(
        default="trn1.32xlarge", description="Node type; sets devices, resources and peak FLOPS."
    )
    nodes: int = Field(default=1, ge=1, le=1024)
    processes_per_node: int | None = Field(
        default=None, ge=1, le=256, description="Default: from instanceType (trn1.32xlarge: 32)."
    )
    global_batch_size: int = Field(default=512, ge=1, le=1 << 24, description="Sequences/step.")
    micro_batch_size: int = Field(default=1, ge=1, le=4096, description="Sequences/forward.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    max_steps: int | None = Field(default=None, ge=1, le=1 << 40)
    max_tokens: int | None = Field(
        default=None, ge=1, le=1 << 60, description="Alternative to maxSteps (rounded up)."
    )
    precision: Precision = "bf16"
    activation_checkpointing: ActivationCheckpointing = "full"
    compile: bool = Field(default=False, description="torch.compile (native backend).")
    fused_loss: bool = Field(
        default=False,
        description="native: LM head + cross entropy in token chunks, gradients made in the "
        "forward pass, so the [tokens, vocab] logits are never held whole (less memory: room "
        "for a larger microBatchSize).",
    )
    float8: bool = Field(
        default=False,
        description="native backend on NVIDIA GPUs of compute capability 8.9+ (H100, H200): "
        "the decoder blocks' linear layers train in float8 through torchao (dynamic "
        "tensorwise scales; weights, optimizer state and checkpoints stay as in bf16). Off by "
        "default until measurements show a gain (docs/PERFORMANCE.md).",
    )
    seed: int = Field(default=1234, ge=0, le=2**32 - 1)
    eval_every_steps: int | None = Field(
        default=None,
        ge=1,
        le=10**7,
        description="Held-out loss per data source every N steps (and at the last step), to "
        "TensorBoard and progress.json; needs data.heldOutFraction > 0.",
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _check(self) -> TrainingSpec:
        problems: list[tuple[str, str]] = []
        if (self.max_steps is None) == (self.max_tokens is None):
            problems.append(("maxSteps", "set exactly one of maxSteps or maxTokens"))
        if self.global_batch_size % self.micro_batch_size:
            problems.append(
                (
                    "globalBatchSize",
                    f"{MSG_GBS_MULTIPLE}: {self.global_batch_size} is not a multiple of "
                    f"{self.micro_batch_size}",
                )
            )
        world = self.nodes * self.resolved_processes_per_node()
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if world % model_parallel:
            problems.append(
                (
                    "tensorParallel",
                    f"{MSG_MP_DIVIDES_WORLD}: {self.tensor_parallel} x "
                    f"{self.pipeline_parallel} = {model_parallel} does not divide "
                    f"{self.nodes} x {self.resolved_processes_per_node()} = {world}",
                )
            )
        seen: dict[str, int] = {}
        for i, env in enumerate(self.env):
            if env.name in seen:
                problems.append(
                    (
                        f"env[{i}].name",
                        f"{MSG_DUPLICATE_ENV}: {env.name} is also env[{seen[env.name]}]",
                    )
                )
            seen.setdefault(env.name, i)
        if self.sequence_parallel and self.tensor_parallel == 1:
            problems.append(("sequenceParallel", "sequenceParallel needs tensorParallel > 1"))
        if self.backend == "nxd" and not self.instance_type.startswith("trn"):
            problems.append(
                (
                    "backend",
                    f"backend nxd runs on Trainium only (instanceType {self.instance_type}); "
                    "use native or auto",
                )
            )
        raise_if(problems)
        return self

    def resolved_processes_per_node(self) -> int:
        if self.processes_per_node is not None:
            return self.processes_per_node
        return instance_type(self.instance_type).processes_per_node

    def resolved_backend(self) -> Literal["nxd", "native"]:
        """auto → nxd on trn1/trn1n (XLA + NxD is the trn1 path), native everywhere else
        (CUDA, CPU, and trn2 through TorchNeuron)."""
        if self.backend != "auto":
            return self.backend
        return "nxd" if self.instance_type.startswith("trn1") else "native"

    def world_size(self) -> int:
        return self.nodes * self.resolved_processes_per_node()


class ScratchSpec(CamelModel):
    """Node-local space for checkpoint writes before upload (and for compile caches)."""

    type: Literal["emptyDir", "hostPath", "pvc"] = Field(
        default="emptyDir",
        description="emptyDir (default), hostPath (an instance-store NVMe mount), or pvc.",
    )
    path: str | None = Field(
        default=None, max_length=URI_MAX_LENGTH, pattern=r"^/", description="hostPath only."
    )
    claim_name: K8sName | None = Field(default=None, description="pvc only.")
    size_limit: Quantity | None = Field(default=None, description="emptyDir size limit.")
    mount_path: str = Field(default="/scratch", max_length=URI_MAX_LENGTH, pattern=r"^/")

    @model_validator(mode="after")
    def _check(self) -> ScratchSpec:
        problems: list[tuple[str, str]] = []
        if self.type == "hostPath" and self.path is None:
            problems.append(("path", "scratch type hostPath needs path (e.g. /local/nvme)"))
        if self.type == "pvc" and self.claim_name is None:
            problems.append(("claimName", "scratch type pvc needs claimName"))
        if self.type != "hostPath" and self.path is not None:
            problems.append(("path", "scratch path is only used with type hostPath"))
        if self.type != "pvc" and self.claim_name is not None:
            problems.append(("claimName", "scratch claimName is only used with type pvc"))
        for key, path in (("mountPath", self.mount_path), ("path", self.path or "")):
            if re.search(DOT_SEGMENT_PATTERN, path):
                problems.append((key, MSG_DOT_SEGMENTS))
        raise_if(problems)
        return self


class CheckpointsSpec(CamelModel):
    s3_uri: StorageUri = Field(
        description="Checkpoint root: step_<N>/ tags, pretrained_weight/, progress.json, "
        "tensorboard/ and (by default) the tokenized data/ live here."
    )
    every_steps: int = Field(default=100, ge=1, le=1 << 30, description="Save every N steps.")
    keep: int = Field(default=2, ge=1, le=1000, description="Committed checkpoints kept.")
    async_save: bool = Field(default=True, description="Save without stalling the step loop.")
    restore_whole_tag: bool = Field(
        default=False,
        description="On resume every node downloads whole checkpoint tags, not only its "
        "ranks' files: an escape hatch should the per-node selection be wrong.",
    )
    scratch: ScratchSpec = Field(default_factory=ScratchSpec)


class OutputSpec(CamelModel):
    s3_uri: StorageUri = Field(description="The final Hugging Face model goes here.")


class ContinualPretrainSpec(CamelModel):
    model: ModelSpec
    data: DataSpec
    training: TrainingSpec
    checkpoints: CheckpointsSpec
    output: OutputSpec
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    resiliency: ResiliencySpec = Field(default_factory=ResiliencySpec)
    suspend: bool = Field(default=False, description="true: stop pods, keep checkpoints.")

    @model_validator(mode="after")
    def _env_vs_runtime(self) -> ContinualPretrainSpec:
        """The names the operator sets only when a runtime Secret reference asks for them."""
        problems: list[tuple[str, str]] = []
        taken = set(credential_env_names(self.runtime))
        for i, env in enumerate(self.training.env):
            if env.name in taken:
                problems.append(
                    (
                        f"training.env[{i}].name",
                        f"env {env.name} {MSG_CREDENTIAL_ENV}",
                    )
                )
        raise_if(problems)
        return self

    # Derived values the operator, the planner and local mode share.

    def tokenizer_uri(self) -> str:
        return self.model.tokenizer or self.model.source

    def data_uri(self) -> str:
        """Tokenized data: data.tokenizedUri, else <checkpoints.s3Uri>/data/."""
        if self.data.tokenized_uri:
            return self.data.tokenized_uri
        return join_uri(self.checkpoints.s3_uri, "data/")

    def storage_locations(self) -> dict[str, str]:
        """Every storage location the spec sets, by field path (`spec.model.source`, ...,
        `spec.data.sources[0].uri`): the planner checks each, and the dry-run key's template
        cuts each to its scheme (reconcile/admission.py)."""
        fields = {
            "spec.model.source": self.model.source,
            "spec.model.tokenizer": self.model.tokenizer,
            "spec.data.tokenizedUri": self.data.tokenized_uri,
            "spec.checkpoints.s3Uri": self.checkpoints.s3_uri,
            "spec.output.s3Uri": self.output.s3_uri,
            "spec.runtime.neuronCompileCacheUri": self.runtime.neuron_compile_cache_uri,
        }
        for i, src in enumerate(self.data.sources):
            fields[f"spec.data.sources[{i}].uri"] = src.uri
        return {path: value for path, value in fields.items() if value is not None}

    def max_steps(self) -> int:
        """maxSteps, or maxTokens rounded up to whole steps."""
        if self.training.max_steps is not None:
            return self.training.max_steps
        if self.training.max_tokens is None:  # TrainingSpec rejects this; keep mypy honest
            raise ValueError("set exactly one of maxSteps or maxTokens")
        tokens_per_step = self.training.global_batch_size * self.data.block_size
        return -(-self.training.max_tokens // tokens_per_step)


def parse_spec(raw: Any) -> ContinualPretrainSpec:
    """A spec from its wire form with the API server's types: no coercion it refuses ("1"
    for an integer, "yes" for a boolean, 2.5 for an integer). `cpt plan`, `cpt local` and the
    operator all parse specs here, so one set of rules applies everywhere."""
    return ContinualPretrainSpec.model_validate(raw, strict=True)


def join_uri(base: str, *parts: str) -> str:
    """Join a URI/path and relative parts with single slashes (keeps a trailing slash)."""
    out = base
    for part in parts:
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


class ObjectMeta(CamelModel):
    """The subset of metadata the API reads; other keys pass through."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------


class ContinualPretrain(CamelModel):
    """A whole object as in run.yaml / from the API server."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["cpt.dev/v1alpha1"] = "cpt.dev/v1alpha1"
    kind: Literal["ContinualPretrain"] = "ContinualPretrain"
    metadata: ObjectMeta
    spec: ContinualPretrainSpec
    status: ContinualPretrainStatus | None = None


__all__ = [
    "ACCEPTED_SPEC_MAX_BYTES",
    "API_VERSION",
    "CATEGORIES",
    "DEFAULT_IMAGES",
    "DEFAULT_IMAGE_TAG",
    "DEFAULT_MAX_EXCLUDED_NODES",
    "DOT_SEGMENT_PATTERN",
    "ENV_NAME_PATTERN",
    "EVAL_SUMMARY_MAX",
    "EXTRA_NEURON_CC_FLAGS_ENV",
    "GROUP",
    "HF_TOKEN_ENV",
    "INSTANCE_TYPES",
    "KIND",
    "MAX_ATTEMPTS_LIMIT",
    "MAX_EXCLUDED_NODES_LIMIT",
    "MAX_NAME_LENGTH",
    "MSG_CREDENTIAL_ENV",
    "MSG_DOT_SEGMENTS",
    "MSG_DUPLICATE_ENV",
    "MSG_GBS_MULTIPLE",
    "MSG_MP_DIVIDES_WORLD",
    "MSG_RESERVED_ENV",
    "NAME_MAX_LENGTH",
    "NAME_PATTERN",
    "PLURAL",
    "RESERVED_ENV_NAMES",
    "RESERVED_ENV_PREFIXES",
    "S3_CREDENTIAL_ENV",
    "SECRET_ENV_PATTERN",
    "SHORT_NAMES",
    "SINGULAR",
    "TERMINAL_PHASES",
    "URI_MAX_LENGTH",
    "VERSION",
    "AcceptedSpec",
    "ActivationCheckpointing",
    "AttemptStatus",
    "Backend",
    "CheckpointStatus",
    "CheckpointsSpec",
    "ChildrenStatus",
    "Condition",
    "ConditionType",
    "ConfigMapKeySelector",
    "ContinualPretrain",
    "ContinualPretrainSpec",
    "ContinualPretrainStatus",
    "DataSpec",
    "EnvVar",
    "EvalStatus",
    "ExcludedNode",
    "FieldErrors",
    "GangScheduling",
    "ImagesSpec",
    "K8sName",
    "ModelSpec",
    "ModelUri",
    "Phase",
    "PlanSummary",
    "Precision",
    "PreflightStatus",
    "ProgressStatus",
    "Quantity",
    "ResourceRequests",
    "RuntimeSpec",
    "S3CredentialsSecretRef",
    "SecretKeySelector",
    "SourceEvalStatus",
    "StatusModel",
    "StorageUri",
    "Toleration",
    "TrainingSpec",
    "credential_env_names",
    "is_hf_uri",
    "is_local_path",
    "is_s3_uri",
    "parse_spec",
    "raise_if",
]
