"""The nxd trainer's pure decisions: the run's plan (DP, micro-batches, precision), NxD's
config, parameter groups, what a resume may load and which files each node restores, when to
save and log. Nothing here needs torch_xla or neuronx_distributed, so it is tested on any host.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpt_training import storage
from cpt_training.config import ConfigError, TrainStage
from cpt_training.nxd.convert import layout_record
from cpt_training.nxd.layout import (
    LlamaShape,
    NxdLayout,
    RankCoords,
    nxd_rank_coords,
    nxd_rank_files,
    plan_layout,
)
from cpt_training.nxd.precision import PrecisionRecipe, effective_zero1, recipe

if TYPE_CHECKING:
    from cpt_training.checkpoint import FileSelector, Selection, TagFiles

PRETRAINED = "pretrained_weight"
PRECOMPILE_ENV = "NEURON_EXTRACT_GRAPHS_ONLY"
PRECOMPILE_DEFAULT_STEPS = 3


# ---------------------------------------------------------------------------------------------
# Pure decisions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NxdPlan:
    """Parallel degrees and batch arithmetic of one attempt."""

    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch: int
    grad_accum: int
    """Micro-batches per optimizer step per DP replica (PP: NxD's ``num_microbatches``)."""
    seq_len: int
    zero1: bool
    sequence_parallel: bool

    @property
    def per_replica_batch(self) -> int:
        return self.micro_batch * self.grad_accum

    @property
    def num_microbatches(self) -> int:
        return self.grad_accum if self.pp > 1 else 1

    @property
    def tokens_per_step(self) -> int:
        return self.dp * self.per_replica_batch * self.seq_len

    @classmethod
    def make(cls, cfg: TrainStage, world_size: int) -> NxdPlan:
        p = cfg.parallelism
        tp, pp = p.tensor_parallel, p.pipeline_parallel
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not a multiple of tensorParallel x "
                f"pipelineParallel ({tp} x {pp} = {tp * pp})"
            )
        dp = world_size // (tp * pp)
        per_round = cfg.micro_batch_size * dp
        if cfg.global_batch_size % per_round:
            raise ConfigError(
                f"globalBatchSize ({cfg.global_batch_size}) must be a multiple of "
                f"microBatchSize x data-parallel ranks ({cfg.micro_batch_size} x {dp} = "
                f"{per_round})"
            )
        if cfg.device not in ("auto", "neuron", "xla"):
            raise ConfigError(f"device {cfg.device!r} with backend nxd; allowed: auto, xla")
        return cls(
            world_size=world_size,
            tp=tp,
            pp=pp,
            dp=dp,
            micro_batch=cfg.micro_batch_size,
            grad_accum=cfg.global_batch_size // per_round,
            seq_len=cfg.seq_len,
            zero1=effective_zero1(p.zero1, dp),
            sequence_parallel=p.sequence_parallel and tp > 1,
        )


def precision_recipe(cfg: TrainStage, plan: NxdPlan) -> PrecisionRecipe:
    """The attempt's precision recipe (docs/nxd.md, Precision recipe): keyed on ZeRO-1 as
    it runs (DP > 1), the same function the operator uses for the pod env."""
    return recipe(cfg.precision, cfg.parallelism.zero1, plan.dp)


def mixed_precision_config(cfg: TrainStage, plan: NxdPlan) -> dict[str, bool]:
    """bf16 with ZeRO-1: fp32 master weights + fp32 grad accumulation (NxD's "GPU-compatible
    precision"); NxD allows master weights only with ZeRO-1, so without it there are none."""
    return precision_recipe(cfg, plan).mixed_precision_config()


def optimizer_config(cfg: TrainStage, plan: NxdPlan) -> dict[str, Any]:
    clip = cfg.optimizer.grad_clip
    return {
        "zero_one_enabled": plan.zero1,
        "grad_clipping": clip > 0,
        "max_grad_norm": clip if clip > 0 else 1.0,
    }


def nxd_config_kwargs(
    cfg: TrainStage,
    plan: NxdPlan,
    *,
    transformer_layer_cls: type,
    leaf_module_cls: list[str],
    activation_checkpoint: tuple[type, ...] | None,
    param_init_fn: Any,
) -> dict[str, Any]:
    """Keyword arguments of ``neuronx_distributed.neuronx_distributed_config``."""
    pipeline = None
    if plan.pp > 1:
        pipeline = {
            "transformer_layer_cls": transformer_layer_cls,
            "num_microbatches": plan.num_microbatches,
            "output_loss_value_spec": True,  # forward returns the loss tensor itself
            "input_names": ["input_ids", "labels"],
            "auto_partition": True,  # even split, remainder to later stages: the converter's
            "leaf_module_cls": list(leaf_module_cls),
            "use_zero1_optimizer": plan.zero1,
            "use_optimizer_wrapper": True,
            "broadcast_and_average_loss": True,  # every rank (rank 0 logs) gets the DP mean
            "deallocate_pipeline_outputs": True,
        }
    return {
        "tensor_parallel_size": plan.tp,
        "pipeline_parallel_size": plan.pp,
        "pipeline_config": pipeline,
        "optimizer_config": optimizer_config(cfg, plan),
        "sequence_parallel": plan.sequence_parallel,
        "activation_checkpoint_config": activation_checkpoint,
        "mixed_precision_config": mixed_precision_config(cfg, plan),
        "model_init_config": {
            "meta_device_init": True,  # 70B does not fit in host RAM 32 times over
            "param_init_fn": param_init_fn,
            "sequential_move_factor": 11,
        },
    }


def _no_decay(name: str, ndim: int) -> bool:
    return ndim < 2 or "norm" in name or name.endswith(".bias")


def param_groups(
    named_params: Iterable[tuple[str, Any]], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on norms/biases; the decay value from the config
    is set on the group (a group's value overrides the optimizer default)."""
    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, p in named_params:
        (no_decay if _no_decay(name, p.dim()) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def world_record(plan: NxdPlan, layout: NxdLayout) -> dict[str, Any]:
    """What a tag records about the run that wrote it (manifest ``world``)."""
    return {
        "backend": "nxd",
        **layout_record(layout),
        "dataParallel": plan.dp,
        "zero1": plan.zero1,
        "globalBatchSize": plan.dp * plan.per_replica_batch,
        "seqLen": plan.seq_len,
    }


def check_resume(saved: Mapping[str, Any], plan: NxdPlan, *, tag: str) -> None:
    """NxD loads a checkpoint only into the same model-parallel degrees (and, for ZeRO-1
    optimizer state, the same DP degree). Refuse early with both sides named."""
    if saved.get("backend", "nxd") != "nxd":
        raise ConfigError(f"{tag} was written by backend {saved.get('backend')!r}, not nxd")
    wanted = {"tensorParallel": plan.tp, "pipelineParallel": plan.pp}
    if tag != PRETRAINED:
        wanted["zero1"] = plan.zero1
        if plan.zero1:
            wanted["dataParallel"] = plan.dp
    diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}={a} in the checkpoint but {b} now" for k, (a, b) in diff.items())
        hint = (
            "re-run convert-to-nxd with this attempt's degrees"
            if tag == PRETRAINED
            else "resume with the degrees (and node count) that wrote it"
        )
        raise ConfigError(f"cannot load {tag}: {detail}; NxD needs identical degrees: {hint}")


def resume_refusal(plan: NxdPlan) -> Callable[[str, Any], str | None]:
    """``check_resume`` as a pre-download check for ``restore_distributed(refuse=...)``."""

    def refuse(tag: str, manifest: Any) -> str | None:
        try:
            check_resume(manifest.world, plan, tag=tag)
        except ConfigError as exc:
            return str(exc)
        return None

    return refuse


def layout_from_record(shape: LlamaShape, saved: Mapping[str, Any]) -> NxdLayout:
    try:
        return plan_layout(
            shape,
            tp=int(saved["tensorParallel"]),
            pp=int(saved["pipelineParallel"]),
            kv_size_multiplier=int(saved.get("kvSizeMultiplier", 1)),
            qkv_linear=bool(saved.get("qkvLinear", False)),
            hw_backend=str(saved.get("hwBackend", "trn1")),
        )
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"the checkpoint's recorded layout is unusable: {exc}") from None


def user_content(step: int, plan: NxdPlan, layout: NxdLayout, attempt: int) -> dict[str, Any]:
    """Saved next to each tag (NxD ``user_content.pt``): enough to resume and to audit."""
    return {
        "step": step,
        "consumedSequences": step * plan.dp * plan.per_replica_batch,
        "attempt": attempt,
        "world": world_record(plan, layout),
    }


def restore_selector(plan: NxdPlan, rank: int, local_world_size: int | None) -> FileSelector:
    """The restore file selector of one rank (``checkpoint.select``): the tag's shared files
    plus this rank's model shard and optimizer shard, at the coordinates NxD will give it.
    A tag written with other degrees is restored whole (the trainer refuses such a tag before
    the download, ``resume_refusal``; whole is the safe answer without that check); so is one
    whose files this layout does not explain."""
    from cpt_training.checkpoint import Selection

    refusal = resume_refusal(plan)

    def select(view: TagFiles) -> Selection:
        reason = refusal(view.tag, view.manifest)
        if reason:
            return Selection.whole(reason)
        coords = nxd_rank_coords(
            rank,
            world_size=plan.world_size,
            tp=plan.tp,
            pp=plan.pp,
            local_world_size=local_world_size,
        )
        files = nxd_rank_files(view.paths, coords, zero1=plan.zero1)
        if files is None:
            return Selection.whole(
                f"its files do not follow the NxD layout for rank {rank} at {coords}"
            )
        return Selection.of(files)

    return select


def missing_rank_files(local_tag_dir: Path, coords: RankCoords, zero1: bool) -> list[str]:
    """Files this rank's ``load_checkpoint`` will read that the node did not restore (checked
    against the real NxD coordinates once NxD is initialised: a loud error beats a missing
    file deep inside NxD)."""
    from cpt_training.checkpoint import MANIFEST_NAME

    manifest = json.loads((local_tag_dir / MANIFEST_NAME).read_text())
    paths = [str(f["path"]) for f in manifest["files"]]
    needed = nxd_rank_files(paths, coords, zero1=zero1)
    return sorted(
        p for p in (needed if needed is not None else paths) if not (local_tag_dir / p).is_file()
    )


def resume_step(content: Mapping[str, Any] | None, tag_step: int, tag: str) -> int:
    """The step to continue from, cross-checked against the tag name."""
    if content is None or "step" not in content:
        raise RuntimeError(f"{tag} has no user_content with a step: not a cpt nxd checkpoint")
    step = int(content["step"])
    if step != tag_step:
        raise RuntimeError(f"{tag} holds step {step}, its name says {tag_step}")
    return step


def save_due(step: int, cfg: TrainStage) -> bool:
    return step % cfg.checkpoint.every_steps == 0 or step == cfg.max_steps


def log_due(step: int, start: int, cfg: TrainStage) -> bool:
    return step % cfg.log_every == 0 or step == cfg.max_steps or step == start + 1


def tag_dirs(local_root: Path, tag: str) -> list[Path]:
    """Directories NxD writes into: created on every node before a save (NxD creates them on
    global rank 0 only, assuming a shared filesystem)."""
    return [local_root / tag, local_root / tag / "model", local_root / tag / "optim"]


def is_precompile(environ: Mapping[str, str]) -> bool:
    return environ.get(PRECOMPILE_ENV, "") not in ("", "0")


def steps_this_process(cfg: TrainStage, precompile: bool) -> int | None:
    if cfg.stop_after_steps is not None:
        return cfg.stop_after_steps
    return PRECOMPILE_DEFAULT_STEPS if precompile else None


def tensorboard_uri(cfg: TrainStage) -> str:
    base = cfg.tensorboard_uri or storage.join_uri(cfg.checkpoint.uri, "tensorboard")
    return storage.join_uri(base, f"attempt-{cfg.attempt}")


def stack_micro_batches(micro_batches: list[Any], seq_len: int) -> Any:
    """[grad_accum x [mbs, seq]] -> [grad_accum * mbs, seq] int64 (the PP step's batch)."""
    import numpy as np

    out = np.concatenate(micro_batches, axis=0)
    if out.shape[1] != seq_len:
        raise ConfigError(f"data blocks hold {out.shape[1]} tokens but seqLen is {seq_len}")
    return out
