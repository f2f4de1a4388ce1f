"""ContinualPretrain spec → the stage configs each `cpt-train <stage>` container receives.

This is the one place where the user-facing spec meets the workload contract
(`cpt_training.config`). The operator and local mode both call it, so a run behaves the same in
a cluster and on a laptop. Derived locations follow docs/architecture.md:

* tokenized data: `data.tokenizedUri`, else `<checkpoints>/data/`
* progress:       `<checkpoints>/progress.json`
* TensorBoard:    `<checkpoints>/tensorboard/` (the trainer adds `attempt-<n>/`)
* NxD weights:    `<checkpoints>/pretrained_weight`
* compile cache:  `runtime.neuronCompileCacheUri/<namespace>/<run>/`,
                  else `<checkpoints>/neuron-compile-cache/`

Checkpoint restore is the trainer's job: every attempt gets the same checkpoint root and resumes
from the newest committed tag under it, so the operator never passes a resume path that could go
stale between deciding and starting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cpt_operator.api.models import ContinualPretrainSpec, join_uri
from cpt_training.config import (
    CheckpointPolicy,
    ConvertToNxdStage,
    ExportHfStage,
    ParallelismConfig,
    PreflightStage,
    TokenizeStage,
    TrainStage,
    mixture_of,
)
from cpt_training.flops import instance_type as lookup_instance

Device = Literal["auto", "cuda", "cpu", "neuron", "xla"]

PRETRAINED_DIR = "pretrained_weight"
PROGRESS_FILE = "progress.json"
TENSORBOARD_DIR = "tensorboard/"
COMPILE_CACHE_DIR = "neuron-compile-cache/"
PREFLIGHT_RESULT = "preflight/result.json"


@dataclass(frozen=True)
class RunPaths:
    """Every storage location of a run, derived once."""

    checkpoints: str
    data: str
    progress: str
    tensorboard: str
    pretrained: str
    output: str
    preflight_result: str
    compile_cache: str


def paths(spec: ContinualPretrainSpec, run: str, namespace: str = "") -> RunPaths:
    ckpt = spec.checkpoints.s3_uri
    cache_root = spec.runtime.neuron_compile_cache_uri
    if cache_root:
        # Never share a cache between runs: a half-written graph of one run is another's
        # corrupt cache hit (Neuron samples warn about exactly this).
        cache = join_uri(cache_root, f"{namespace or 'default'}/{run}/")
    else:
        cache = join_uri(ckpt, COMPILE_CACHE_DIR)
    return RunPaths(
        checkpoints=ckpt,
        data=spec.data_uri(),
        progress=join_uri(ckpt, PROGRESS_FILE),
        tensorboard=join_uri(ckpt, TENSORBOARD_DIR),
        pretrained=join_uri(ckpt, PRETRAINED_DIR),
        output=spec.output.s3_uri,
        preflight_result=join_uri(ckpt, PREFLIGHT_RESULT),
        compile_cache=cache,
    )


def device_for(spec: ContinualPretrainSpec) -> Device:
    """What one training process drives: XLA devices for NxD on trn1, TorchNeuron's `neuron`
    device for native on Trainium, CUDA on NVIDIA, else CPU."""
    accel = lookup_instance(spec.training.instance_type).accelerator
    backend = spec.training.resolved_backend()
    if accel == "neuron":
        return "xla" if backend == "nxd" else "neuron"
    if accel == "cuda":
        return "cuda"
    return "cpu"


def hw_backend(spec: ContinualPretrainSpec) -> Literal["trn1", "trn2"]:
    return "trn2" if spec.training.instance_type.startswith("trn2") else "trn1"


def tokenize_stage(spec: ContinualPretrainSpec, run: str, namespace: str = "") -> TokenizeStage:
    """One config for all shards: each pod reads its shard from JOB_COMPLETION_INDEX."""
    return TokenizeStage(
        sources=spec.data.sources,
        text_field=spec.data.text_field,
        tokenizer_uri=spec.tokenizer_uri(),
        block_size=spec.data.block_size,
        packing=spec.data.packing,
        output_uri=paths(spec, run, namespace).data,
        num_shards=spec.data.shards,
        shard_index=None,
        workers=spec.data.workers_per_shard,
        held_out_fraction=spec.data.held_out_fraction,
        seed=spec.training.seed,
    )


def convert_to_nxd_stage(
    spec: ContinualPretrainSpec, run: str, namespace: str = "", *, kv_size_multiplier: int = 1
) -> ConvertToNxdStage:
    return ConvertToNxdStage(
        model_uri=spec.model.source,
        output_uri=paths(spec, run, namespace).pretrained,
        tensor_parallel=spec.training.tensor_parallel,
        pipeline_parallel=spec.training.pipeline_parallel,
        kv_size_multiplier=kv_size_multiplier,
        hw_backend=hw_backend(spec),
    )


def train_stage(
    spec: ContinualPretrainSpec, run: str, attempt: int, namespace: str = ""
) -> TrainStage:
    t = spec.training
    p = paths(spec, run, namespace)
    return TrainStage(
        backend=t.resolved_backend(),
        device=device_for(spec),
        run_name=run,
        attempt=attempt,
        model_uri=spec.model.source,
        config_overrides=dict(spec.model.config_overrides),
        data_uri=p.data,
        seq_len=spec.data.block_size,
        parallelism=ParallelismConfig(
            tensor_parallel=t.tensor_parallel,
            pipeline_parallel=t.pipeline_parallel,
            zero1=t.zero1,
            sequence_parallel=t.sequence_parallel,
            fsdp_single_device=t.fsdp_single_device,
        ),
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        optimizer=t.optimizer,
        max_steps=spec.max_steps(),
        precision=t.precision,
        activation_checkpointing=t.activation_checkpointing,
        compile=t.compile,
        fused_loss=t.fused_loss,
        float8=t.float8,
        seed=t.seed,
        mixture=mixture_of(spec.data.sources),
        eval_every_steps=t.eval_every_steps,
        checkpoint=CheckpointPolicy(
            uri=p.checkpoints,
            every_steps=spec.checkpoints.every_steps,
            keep=spec.checkpoints.keep,
            local_dir=join_uri(spec.checkpoints.scratch.mount_path, "checkpoints"),
            async_save=spec.checkpoints.async_save,
            restore_whole_tag=spec.checkpoints.restore_whole_tag,
        ),
        progress_uri=p.progress,
        tensorboard_uri=p.tensorboard,
        instance_type=t.instance_type,
    )


def export_stage(spec: ContinualPretrainSpec, run: str, namespace: str = "") -> ExportHfStage:
    t = spec.training
    p = paths(spec, run, namespace)
    return ExportHfStage(
        backend=t.resolved_backend(),
        model_uri=spec.model.source,
        tokenizer_uri=spec.tokenizer_uri(),
        config_overrides=dict(spec.model.config_overrides),
        checkpoint_uri=p.checkpoints,
        output_uri=p.output,
        data_uri=p.data,
        tensor_parallel=t.tensor_parallel,
        pipeline_parallel=t.pipeline_parallel,
        dtype="float32" if t.precision == "fp32" else "bfloat16",
        run_name=run,
        sources=spec.data.sources,
        mixture=mixture_of(spec.data.sources),
        global_batch_size=t.global_batch_size,
        seq_len=spec.data.block_size,
        optimizer=t.optimizer,
        instance_type=t.instance_type,
        nodes=t.nodes,
    )


def preflight_stage(spec: ContinualPretrainSpec, run: str, namespace: str = "") -> PreflightStage:
    return PreflightStage(
        device=device_for(spec),
        min_bus_bandwidth_gbps=spec.resiliency.preflight.min_bus_bandwidth_gbps,
        result_uri=paths(spec, run, namespace).preflight_result,
    )
