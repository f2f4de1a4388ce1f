"""The nxd backend's precision recipe: one pure function of (precision, zero1, DP).

Both the operator (pod env, torch-free) and the trainer (layer dtype, NxD's
``mixed_precision_config``, the optimizer class) read the same :class:`PrecisionRecipe`, so
what a pod's environment says about stochastic rounding always matches how its weights are
updated. The table with the NxD v2.28.0 file and line each row follows is in docs/nxd.md
("Precision recipe").

Why the rows are what they are:

* Layers are built in the run's dtype (bf16 for ``precision: bf16``), as NxD's Llama
  examples build theirs from the model config's ``torch_dtype``. Neuron named SDK 2.24 the
  last release supporting ``XLA_DOWNCAST_BF16``/``XLA_USE_BF16`` and its migration note says
  not to set them with bf16 models, so cpt never turns them on: the dtype a tensor has in
  torch is the dtype it has on the device. With master weights ``XLA_DOWNCAST_BF16=0`` is set
  explicitly: NxD's trainer takes that as its bf16-in-torch case and halves the ZeRO-1 bucket
  cap (130 to 65 MB) so a bucket holds the bytes it holds in NxD's downcast runs.
* ZeRO-1 is effective only with more than one data-parallel rank (the trainer turns it off at
  DP=1: there is nothing to shard). With ZeRO-1, bf16 gets NxD's "GPU-compatible precision":
  fp32 master weights and fp32 gradient accumulation inside the ZeRO-1 optimizer, and the
  runtime's stochastic rounding off (the fp32 master copy already keeps small updates).
* Without ZeRO-1 NxD refuses master weights, so bf16 weights are updated in place: the
  optimizer keeps its moments in fp32 (NxD's ``AdamW_FP32OptimParams`` idea, done with an
  explicit upcast because that class only upcasts under ``XLA_DOWNCAST_BF16``) and stochastic
  rounding is on, so the bf16 write of each update is unbiased.
* fp32 has nothing to round: fp32 layers, plain AdamW, no master weights, rounding off.
* ``XLA_DISABLE_FUNCTIONALIZATION=0`` whenever ZeRO-1 is effective (NxD's 70B script: it
  closes a convergence gap of ZeRO-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Precision = Literal["bf16", "fp32"]
OptimizerKind = Literal["adamw", "adamw-fp32-states"]


@dataclass(frozen=True)
class PrecisionRecipe:
    """How one attempt holds and updates its weights."""

    layer_dtype: Literal["bfloat16", "float32"]
    zero1: bool
    """ZeRO-1 as it actually runs (configured and DP > 1)."""
    master_weights: bool
    """fp32 master weights (NxD ``use_master_weights``); only ever with ZeRO-1."""
    fp32_grad_acc: bool
    """fp32 gradient accumulation (NxD ``use_fp32_grad_acc``); only ever with ZeRO-1."""
    optimizer: OptimizerKind
    """``adamw``: torch.optim.AdamW (inside NxD's ZeRO-1 wrapper when ``zero1``);
    ``adamw-fp32-states``: cpt's AdamW with fp32 moments for bf16 weights."""
    stochastic_rounding: bool
    disable_functionalization: bool
    """Set ``XLA_DISABLE_FUNCTIONALIZATION=0`` (ZeRO-1 only)."""

    def env(self) -> dict[str, str]:
        """The precision part of the pod env. ``XLA_DOWNCAST_BF16`` is never ``1``; with master
        weights it is ``0``, which NxD's trainer reads as "bf16 tensors in torch" and halves
        the ZeRO-1 bucket cap, so buckets hold the bytes they hold in its downcast runs."""
        out = {"NEURON_RT_STOCHASTIC_ROUNDING_EN": "1" if self.stochastic_rounding else "0"}
        if self.master_weights:
            out["XLA_DOWNCAST_BF16"] = "0"
        if self.disable_functionalization:
            out["XLA_DISABLE_FUNCTIONALIZATION"] = "0"
        return out

    def mixed_precision_config(self) -> dict[str, bool]:
        """NxD's ``mixed_precision_config`` argument of ``neuronx_distributed_config``."""
        return {
            "use_master_weights": self.master_weights,
            "use_fp32_grad_acc": self.fp32_grad_acc,
            "use_master_weights_in_ckpt": False,
        }


def effective_zero1(zero1: bool, data_parallel: int) -> bool:
    """ZeRO-1 shards optimizer state over DP ranks; with one rank the trainer runs without."""
    return zero1 and data_parallel > 1


def recipe(precision: Precision, zero1: bool, data_parallel: int) -> PrecisionRecipe:
    """The recipe of one (precision, configured zero1, DP) case; see the module docstring."""
    if data_parallel < 1:
        raise ValueError(f"data-parallel degree must be >= 1, got {data_parallel}")
    z1 = effective_zero1(zero1, data_parallel)
    bf16 = precision == "bf16"
    master = bf16 and z1  # NxD: master weights (and fp32 grad acc) only inside ZeRO-1
    in_place_bf16 = bf16 and not z1  # bf16 weights updated in place: fp32 moments, rounding
    return PrecisionRecipe(
        layer_dtype="bfloat16" if bf16 else "float32",
        zero1=z1,
        master_weights=master,
        fp32_grad_acc=master,
        optimizer="adamw-fp32-states" if in_place_bf16 else "adamw",
        stochastic_rounding=in_place_bf16,
        disable_functionalization=z1,
    )


def data_parallel_degree(world_size: int, tensor_parallel: int, pipeline_parallel: int) -> int:
    """DP = world / (TP x PP); a world that does not divide is an error naming the degrees."""
    per_replica = tensor_parallel * pipeline_parallel
    if world_size < 1 or world_size % per_replica:
        raise ValueError(
            f"world size {world_size} is not a positive multiple of tensorParallel x "
            f"pipelineParallel ({tensor_parallel} x {pipeline_parallel} = {per_replica})"
        )
    return world_size // per_replica
