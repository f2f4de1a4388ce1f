"""Apply tensor parallelism, activation checkpointing, compilation and FSDP2, in that order.

The order matters: TP turns block weights into DTensors on the ``tp`` mesh dimension; AC and
compile wrap the block's math (not its parameters); FSDP2 then shards every parameter over the
``dp`` dimension (2-D DTensors for TP'd weights) and owns the bf16 all-gathers.

Tensor parallelism is Megatron-style inside each block: q/k/v and gate/up are column-parallel
(each rank owns whole heads / a slice of the MLP), o_proj and down_proj are row-parallel (one
all-reduce after attention and one after the MLP). Embedding, final norm and LM head stay
replicated across TP ranks (sharded over DP by FSDP): the Llama vocab matrices are a small share
of a TP-sized model and this keeps the loss an ordinary local cross entropy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from cpt_training.native.llama import ActivationCheckpointing, DecoderLayer, Llama, LlamaArgs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """How the world is split: ``dp * tp == world_size``."""

    dp: int
    tp: int

    @classmethod
    def plan(cls, world_size: int, tp: int, pp: int = 1) -> Layout:
        if pp != 1:
            raise ValueError(
                f"parallelism.pipelineParallel={pp}: the native backend has no pipeline "
                "parallelism (allowed: 1); use tensorParallel and FSDP data parallelism"
            )
        if tp < 1 or world_size % tp:
            raise ValueError(
                f"parallelism.tensorParallel={tp} must divide the world size ({world_size})"
            )
        return cls(dp=world_size // tp, tp=tp)


def build_mesh(device_type: str, layout: Layout) -> DeviceMesh:
    """A 2-D (dp, tp) mesh; tp is the inner (fastest-varying, intra-node) dimension."""
    return init_device_mesh(device_type, (layout.dp, layout.tp), mesh_dim_names=("dp", "tp"))


def check_tp_shapes(a: LlamaArgs, tp: int) -> None:
    problems = []
    if a.num_heads % tp:
        problems.append(f"num_attention_heads ({a.num_heads})")
    if a.num_kv_heads % tp:
        problems.append(f"num_key_value_heads ({a.num_kv_heads})")
    if a.intermediate_size % tp:
        problems.append(f"intermediate_size ({a.intermediate_size})")
    if problems:
        raise ValueError(
            f"parallelism.tensorParallel={tp} must divide {', '.join(problems)} of the model"
        )


def apply_tp(model: Llama, tp_mesh: DeviceMesh) -> None:
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, plan)


def compile_options(device_type: str, tp: int) -> dict[str, Any]:
    """``torch.compile`` arguments for the blocks.

    One graph per block without breaks where the block holds plain tensors (tp == 1; with TP
    the DTensor redistributions may break the graph). On Trainium TorchNeuron's Dynamo backend
    (``backend="neuron"``, its torch.compile reference) with static shapes: that reference
    lists ``dynamic=True`` as rejected, and torch's default (``None``) would retry a shape
    change with dynamic shapes. Elsewhere torch's default backend (Inductor)."""
    opts: dict[str, Any] = {"fullgraph": tp == 1}
    if device_type == "neuron":
        opts.update(backend="neuron", dynamic=False)
    return opts


def parallelize(
    model: Llama,
    mesh: DeviceMesh,
    *,
    bf16: bool,
    activation_checkpointing: ActivationCheckpointing,
    compile_model: bool,
    device_type: str = "cpu",
    fsdp: bool = True,
) -> Llama:
    """Parallelize ``model`` in place (it may be on the meta device) and return it. Without
    ``fsdp`` (one device only: see ``native/single.py``) the parameters stay plain tensors."""
    tp = mesh["tp"].size()
    if not fsdp and mesh.size() != 1:
        raise ValueError(f"the plain (non-FSDP) path needs one device, the mesh has {mesh.size()}")
    dp_mesh = mesh["dp"]
    if tp > 1:
        check_tp_shapes(model.args, tp)
        apply_tp(model, mesh["tp"])
    model.set_activation_checkpointing(activation_checkpointing)
    if compile_model:
        model.compile_blocks(**compile_options(device_type, tp))
    if not fsdp:
        return model
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    # With one data-parallel rank there is nothing to reshard to: keeping the gathered (cast)
    # weights between forward and backward saves a second all-gather/cast per block.
    reshard = dp_mesh.size() > 1
    layers = list(model.model.layers)
    for i, layer in enumerate(layers):
        assert isinstance(layer, DecoderLayer)
        # The last block's weights are needed again right away by backward: never reshard it.
        fully_shard(
            layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard and i < len(layers) - 1
        )
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    return model
