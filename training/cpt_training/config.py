"""Typed stage configurations: the contract between the operator and the workload.

The operator (and local mode) builds one of these per stage from a ContinualPretrain spec and
hands it to ``cpt-train <stage>`` as JSON in the ``CPT_STAGE_CONFIG`` environment variable.
The same sub-models (optimizer, data sources, checkpoint policy) are reused by the CRD spec,
so there is a single definition of every knob. This module must stay importable without
torch: the operator image does not ship it.

Secrets never appear here: credentials come from the pod's environment (IRSA / Pod Identity,
or a Secret reference the operator maps to env vars).
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel


class ConfigError(ValueError):
    """A config that parsed but cannot run (e.g. batch sizes that do not divide): the stage
    exits 2 (cpt_training/cli.py). Here, in the leaf every stage imports, so raising it never
    makes a stage import the CLI."""


STAGE_CONFIG_ENV = "CPT_STAGE_CONFIG"

S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/([^/\x00]+/?)*)?$"
HF_URI_PATTERN = (
    r"^hf://[A-Za-z0-9][A-Za-z0-9._\-]*/[A-Za-z0-9][A-Za-z0-9._\-]*(@[A-Za-z0-9._\-/]+)?$"
)


class CamelModel(BaseModel):
    """Base for every spec/config model: camelCase on the wire (Kubernetes style),
    snake_case in Python, unknown fields rejected so typos fail loudly."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready dict with camelCase keys, defaults included."""
        return self.model_dump(mode="json", by_alias=True)


ROLE_PATTERN = r"^[a-z0-9]([a-z0-9_.\-]*[a-z0-9])?$"

PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]


PARQUET_CONVERSION = "refs/convert/parquet"
"""The Hub's automatic Parquet conversion of a dataset repository (one branch per repo:
``<config>/<split>/NNNN.parquet``, or ``<config>/partial-<split>/`` for large ones)."""


class DataSource(CamelModel):
    """One input corpus: a Hugging Face dataset, or a prefix of jsonl/parquet/txt files.

    Hub datasets are read as data files (Parquet, JSON lines, text, ...): ``datasets`` 4
    removed loading scripts. A script-only dataset (the seed's ``wikicorpus``) is read through
    the Hub's Parquet conversion (``revision: refs/convert/parquet`` with ``hfConfig``) or
    through explicit ``dataFiles``."""

    hf_dataset: str | None = Field(
        default=None,
        description="Hugging Face dataset id, e.g. 'wikicorpus' (or a local dataset dir).",
    )
    hf_config: str | None = Field(default=None, description="Dataset config name, e.g. 'raw_en'.")
    split: str = Field(default="train", description="Dataset split.")
    revision: str | None = Field(
        default=None,
        description="Dataset revision (commit, tag or branch). 'refs/convert/parquet' reads the "
        "Hub's Parquet conversion (needs hfConfig): the way to load a loading-script dataset.",
    )
    data_files: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Glob patterns of the files to read inside the dataset repo (at revision), "
        "e.g. ['raw_en/partial-train/*.parquet']; they form the split. Overrides hfConfig.",
    )
    uri: str | None = Field(
        default=None,
        description="s3://bucket/prefix/ or a local path of .jsonl, .parquet or .txt files.",
    )
    format: Literal["auto", "jsonl", "parquet", "txt"] = Field(
        default="auto", description="File format for `uri`; auto picks by file extension."
    )
    weight: float | None = Field(
        default=None,
        ge=0,
        le=1e6,
        description="Relative sampling weight in training (set on every source or on none; "
        "none: blocks are drawn in proportion to each source's size). 0: evaluation only.",
    )
    role: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=ROLE_PATTERN,
        description="Name of the source in reports and evaluations, e.g. 'domain' or 'replay' "
        "(unique; default source-<index>).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSource:
        if (self.hf_dataset is None) == (self.uri is None):
            raise ValueError("a data source needs exactly one of hfDataset or uri")
        if self.data_files is not None and self.hf_dataset is None:
            raise ValueError("dataFiles selects files of an hfDataset; a uri source lists its own")
        if self.data_files is not None and self.hf_config is not None:
            raise ValueError(
                "dataFiles and hfConfig both choose what to read: drop hfConfig (put the "
                "config's directory in the dataFiles patterns, e.g. 'raw_en/train/*.parquet')"
            )
        if (
            self.revision == PARQUET_CONVERSION
            and self.hf_config is None
            and self.data_files is None
        ):
            raise ValueError(
                f"revision {PARQUET_CONVERSION} holds one directory per config: set hfConfig "
                "(e.g. raw_en), or dataFiles with the files to read"
            )
        return self

    def hf_data_files(self) -> dict[str, list[str]] | None:
        """The ``data_files`` argument for ``datasets.load_dataset``: explicit ``dataFiles``,
        or the config's files of the Parquet conversion (``*<split>`` matches both
        ``<split>`` and ``partial-<split>``); None for a plain Hub dataset."""
        if self.data_files is not None:
            return {self.split: list(self.data_files)}
        if self.revision == PARQUET_CONVERSION:
            return {self.split: [f"{self.hf_config}/*{self.split}/*.parquet"]}
        return None


def source_name(index: int, src: DataSource) -> str:
    """How reports name a source: its role, else ``source-<index>``."""
    return src.role or f"source-{index}"


def mixture_problems(sources: list[DataSource]) -> list[str]:
    """What is wrong with the sources' weights and roles (empty: fine). Shared by the spec's
    validation and the stage configs, so ``cpt plan``, admission and the trainer agree."""
    problems = []
    weights = [s.weight for s in sources]
    if any(w is not None for w in weights):
        if any(w is None for w in weights):
            missing = [i for i, w in enumerate(weights) if w is None]
            problems.append(
                f"set weight on every data source or on none (sources{missing} have none)"
            )
        elif not any(w for w in weights if w is not None and w > 0):
            problems.append("at least one data source weight must be positive")
    roles = [s.role for s in sources if s.role is not None]
    dupes = sorted({r for r in roles if roles.count(r) > 1})
    if dupes:
        problems.append(f"data source roles must be unique ({', '.join(dupes)} repeated)")
    return problems


class MixtureSource(CamelModel):
    """One source as training sees it: its name and weight (the tokenize stage records its
    blocks per source in the manifest, in the order of ``data.sources``)."""

    name: str = Field(min_length=1, max_length=63)
    weight: float = Field(ge=0)


def mixture_of(sources: list[DataSource]) -> list[MixtureSource] | None:
    """The training mixture of weighted sources; None without weights (natural mixture)."""
    if any(s.weight is None for s in sources):
        return None
    return [
        MixtureSource(name=source_name(i, s), weight=float(s.weight or 0.0))
        for i, s in enumerate(sources)
    ]


class OptimizerConfig(CamelModel):
    """AdamW with the seed's schedule: linear warmup, optional constant hold, then decay."""

    lr: float = Field(default=1.5e-4, gt=0, description="Peak learning rate.")
    min_lr: float = Field(default=1e-5, ge=0, description="Learning rate at the end of decay.")
    warmup_steps: NonNegInt = Field(default=2000, description="Linear warmup steps.")
    constant_steps: NonNegInt = Field(default=0, description="Steps held at peak after warmup.")
    decay_style: Literal["cosine", "linear", "constant", "wsd"] = Field(
        default="cosine",
        description="Decay after warmup (and constantSteps) to minLr at the last step. wsd: "
        "warmup-stable-decay, the peak held until the last cooldownFraction of the run, then "
        "a linear cooldown to minLr (constantSteps is ignored).",
    )
    cooldown_fraction: float = Field(
        default=0.2, gt=0, le=1, description="wsd: the share of maxSteps spent cooling down."
    )
    warmup_start_lr: float = Field(
        default=0.0,
        ge=0,
        description="Rate of the first warmup step's line start: 0 warms up from zero; a "
        "continued run re-warms from e.g. the previous run's minLr.",
    )
    beta1: float = Field(default=0.9, gt=0, lt=1)
    beta2: float = Field(default=0.95, gt=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, ge=0, description="Max global grad norm; 0 disables.")

    @model_validator(mode="after")
    def _min_le_peak(self) -> OptimizerConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"minLr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_start_lr > self.lr:
            raise ValueError(
                f"warmupStartLr ({self.warmup_start_lr}) must not exceed lr ({self.lr})"
            )
        return self


class CheckpointPolicy(CamelModel):
    """Where and how often checkpoints are written, and how many are kept."""

    uri: str = Field(description="s3://... or local path: the durable checkpoint root.")
    every_steps: PositiveInt = Field(default=100, description="Save every N optimizer steps.")
    keep: PositiveInt = Field(default=2, description="Committed checkpoints kept (local and S3).")
    local_dir: str = Field(
        default="/scratch/checkpoints", description="Node-local scratch for checkpoint writes."
    )
    async_save: bool = Field(default=True, description="Save without stalling the step loop.")
    restore_whole_tag: bool = Field(
        default=False,
        description="Every node restores whole checkpoint tags instead of only its ranks' "
        "files: an escape hatch, should the per-node file selection be wrong.",
    )


class StorageTuning(CamelModel):
    """S3 transfer, retry and checksum tuning for a stage's storage I/O. The defaults suit a
    trn1/p5 node and are what every stage ran with when these were environment variables;
    benchmarks and tests change them here, in the typed config, not through the pod's env."""

    transfer_client: Literal["auto", "classic", "crt"] = Field(
        default="auto", description="auto: the AWS CRT client where awscrt is installed."
    )
    target_gbps: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="CRT throughput target; None: CRT's own figure or 10.",
    )
    max_bandwidth: PositiveInt | None = Field(
        default=None, description="Bytes/s cap (classic client only)."
    )
    retry_mode: Literal["legacy", "standard", "adaptive"] = "adaptive"
    max_attempts: PositiveInt = Field(default=10, description="Total attempts per request.")
    max_concurrency: PositiveInt = Field(default=32, description="Parallel requests per transfer.")
    multipart_threshold_mb: PositiveInt = 16
    multipart_chunksize_mb: PositiveInt = 16
    hash_workers: PositiveInt = Field(default=8, description="Checksum threads per node.")

    def transfer_settings(self) -> Any:
        """These knobs as the storage layer's ``TransferSettings``."""
        from cpt_training.storage.settings import MiB, TransferSettings

        return TransferSettings(
            max_concurrency=self.max_concurrency,
            multipart_threshold=self.multipart_threshold_mb * MiB,
            multipart_chunksize=self.multipart_chunksize_mb * MiB,
            max_attempts=self.max_attempts,
            retry_mode=self.retry_mode,
            transfer_client=self.transfer_client,
            max_bandwidth=self.max_bandwidth,
            hash_workers=self.hash_workers,
            crt_target_gbps=self.target_gbps,
        )


# ---------------------------------------------------------------------------------------------
# Stage configs. One per `cpt-train <stage>` subcommand.
# ---------------------------------------------------------------------------------------------


class TokenizeStage(CamelModel):
    """Shard `shard_index` of `num_shards`: tokenize, pack into blocks, write Arrow to output."""

    stage: Literal["tokenize"] = "tokenize"
    sources: list[DataSource] = Field(min_length=1)
    text_field: str = "text"
    tokenizer_uri: str = Field(description="hf://org/name[@rev], s3://... or a local dir.")
    block_size: PositiveInt = 4096
    packing: Literal["concat"] = Field(
        default="concat",
        description="concat: documents joined with EOS and cut into block_size blocks.",
    )
    output_uri: str = Field(description="s3://... or local dir for shards and the manifest.")
    num_shards: PositiveInt = 1
    shard_index: NonNegInt | None = Field(
        default=None, description="None: read JOB_COMPLETION_INDEX (Indexed Job)."
    )
    workers: PositiveInt = Field(default=1, description="Tokenizer processes within a shard.")
    held_out_fraction: float = Field(default=0.0, ge=0, lt=0.5)
    seed: int = 1234
    txt_split: Literal["file", "paragraph"] = Field(
        default="file",
        description="A .txt file is one document (file) or one per blank-line-separated "
        "paragraph (paragraph).",
    )
    storage: StorageTuning = Field(default_factory=StorageTuning)

    @model_validator(mode="after")
    def _mixture(self) -> TokenizeStage:
        problems = mixture_problems(self.sources)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def resolved_shard_index(self) -> int:
        if self.shard_index is not None:
            return self.shard_index
        return int(os.environ.get("JOB_COMPLETION_INDEX", "0"))


class ParallelismConfig(CamelModel):
    tensor_parallel: PositiveInt = 1
    pipeline_parallel: PositiveInt = 1
    zero1: bool = Field(default=True, description="Shard optimizer state over data parallel.")
    sequence_parallel: bool = False
    fsdp_single_device: bool = Field(
        default=False,
        description="native, one device: wrap the model in FSDP2 anyway (the older path). "
        "Off: a plain module with fp32 master weights and bf16 compute copies made once per "
        "optimizer step instead of FSDP's gather and cast every micro batch.",
    )


class TrainStage(CamelModel):
    """One training attempt. Resumes from the newest committed checkpoint under
    `checkpoint.uri` when there is one, else starts from `model_uri` (or, for nxd,
    from the converted `pretrained_weight` tag)."""

    stage: Literal["train"] = "train"
    backend: Literal["native", "nxd"] = "native"
    device: Literal["auto", "cuda", "cpu", "neuron", "xla"] = "auto"
    run_name: str = "run"
    attempt: PositiveInt = 1
    model_uri: str = Field(description="HF model dir/uri with config.json + safetensors.")
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    data_uri: str = Field(description="Tokenized dataset written by the tokenize stage.")
    seq_len: PositiveInt = 4096
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)
    global_batch_size: PositiveInt = 512
    micro_batch_size: PositiveInt = 1
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    max_steps: PositiveInt = 1000
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: Literal["none", "full", "selective"] = "full"
    compile: bool = False
    fused_loss: bool = Field(
        default=False,
        description="native: LM head + cross entropy in token chunks with the gradients made "
        "in the forward pass, so the [tokens, vocab] logits are never held whole.",
    )
    float8: bool = Field(
        default=False,
        description="native: the decoder blocks' linear layers train in float8 (torchao, "
        "dynamic tensorwise scales; needs compute capability >= 8.9 and torchao).",
    )
    seed: int = 1234
    mixture: list[MixtureSource] | None = Field(
        default=None,
        description="Sampling weights per data source, in the order of the tokenize stage's "
        "sources. None: every training block once per epoch, shuffled (natural mixture).",
    )
    checkpoint: CheckpointPolicy
    progress_uri: str | None = Field(
        default=None, description="Where rank 0 writes progress.json for the operator."
    )
    tensorboard_uri: str | None = None
    instance_type: str | None = Field(default=None, description="For the MFU peak table.")
    log_every: PositiveInt = 1
    storage: StorageTuning = Field(default_factory=StorageTuning)
    stop_after_steps: NonNegInt | None = Field(
        default=None, description="Exit cleanly after this many steps in this process (tests)."
    )
    eval_every_steps: PositiveInt | None = Field(
        default=None,
        description="Held-out loss per data source every N steps (and at the last step).",
    )
    eval_blocks: PositiveInt = Field(
        default=8, description="Held-out blocks per source in each evaluation."
    )

    @model_validator(mode="after")
    def _mixture_sane(self) -> TrainStage:
        if self.mixture is not None:
            if not any(m.weight > 0 for m in self.mixture):
                raise ValueError("mixture: at least one weight must be positive")
            names = [m.name for m in self.mixture]
            if len(set(names)) != len(names):
                raise ValueError(f"mixture: source names must be unique, got {names}")
        return self


class ConvertToNxdStage(CamelModel):
    """HF safetensors -> NxD TP/PP-sharded `pretrained_weight` (trn1)."""

    stage: Literal["convert-to-nxd"] = "convert-to-nxd"
    model_uri: str
    output_uri: str = Field(description="<checkpoint root>/pretrained_weight")
    tensor_parallel: PositiveInt = 8
    pipeline_parallel: PositiveInt = 1
    kv_size_multiplier: PositiveInt = 1
    qkv_linear: bool = False
    hw_backend: Literal["trn1", "trn2"] = "trn1"
    storage: StorageTuning = Field(default_factory=StorageTuning)


class ExportHfStage(CamelModel):
    """Newest committed checkpoint -> Hugging Face save_pretrained + tokenizer, then prove it
    loads and report held-out loss."""

    stage: Literal["export-hf"] = "export-hf"
    backend: Literal["native", "nxd"] = "native"
    model_uri: str = Field(description="The base model (config and tokenizer source).")
    tokenizer_uri: str | None = None
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    checkpoint_uri: str = Field(description="Checkpoint root; the newest committed tag is used.")
    output_uri: str
    data_uri: str | None = Field(default=None, description="Tokenized data for held-out loss.")
    eval_blocks: NonNegInt = Field(
        default=8, description="Held-out blocks evaluated (overall, and per source before/after)."
    )
    tensor_parallel: PositiveInt = 1
    pipeline_parallel: PositiveInt = 1
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    # What the model card reports about the run (cpt_training.model_card).
    run_name: str = "run"
    sources: list[DataSource] = Field(default_factory=list, description="The run's data.")
    mixture: list[MixtureSource] | None = None
    global_batch_size: PositiveInt | None = None
    seq_len: PositiveInt | None = None
    optimizer: OptimizerConfig | None = None
    instance_type: str | None = None
    nodes: PositiveInt | None = None
    storage: StorageTuning = Field(default_factory=StorageTuning)


class PreflightStage(CamelModel):
    """All-reduce bus bandwidth and device checks on the training gang shape."""

    stage: Literal["preflight"] = "preflight"
    device: Literal["auto", "cuda", "cpu", "neuron", "xla"] = "auto"
    size_mb: PositiveInt = 64
    iterations: PositiveInt = 5
    min_bus_bandwidth_gbps: float = Field(default=0.0, ge=0)
    result_uri: str | None = None
    storage: StorageTuning = Field(default_factory=StorageTuning)


class PrecompileStage(CamelModel):
    """``neuron_parallel_compile`` over the exact training command (nxd): fills the run's
    Neuron compile cache, then records ``cache_key`` at ``marker_uri`` so a later run with
    the same graphs skips the stage."""

    stage: Literal["precompile"] = "precompile"
    train: TrainStage
    cache_key: str = Field(min_length=8, max_length=64)
    marker_uri: str
    command: list[str] = Field(
        min_length=1,
        description="The training command as the training pods run it; `$(VAR)` is expanded "
        "from this process's environment (the pod's torchrun rendezvous variables).",
    )
    compiler: str = "neuron_parallel_compile"
    storage: StorageTuning = Field(default_factory=StorageTuning)


StageConfig = Annotated[
    TokenizeStage
    | TrainStage
    | ConvertToNxdStage
    | ExportHfStage
    | PreflightStage
    | PrecompileStage,
    Field(discriminator="stage"),
]


class _StageEnvelope(BaseModel):
    config: StageConfig


def parse_stage_config(raw: str | dict[str, Any]) -> BaseModel:
    """Parse a stage config from JSON text or a dict (camelCase or snake_case keys)."""
    import json

    data = json.loads(raw) if isinstance(raw, str) else raw
    return _StageEnvelope.model_validate({"config": data}).config
