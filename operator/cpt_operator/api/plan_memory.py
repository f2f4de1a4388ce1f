"""The planner's memory model (docs/planner.md, "Memory"): bytes per device for the most loaded
pipeline stage. Pure; ``cpt_operator.api.planner`` re-exports every public name here.
"""

from __future__ import annotations

from cpt_operator.api.models import ContinualPretrainSpec
from cpt_operator.api.plan_types import MemoryEstimate, Plan
from cpt_training.flops import GIB, DeviceSpec, ModelShape


def stage_layers(layers: int, stages: int) -> list[int]:
    """NxD's split: an even share each, the remainder one by one to the *last* stages."""
    base, extra = divmod(layers, stages)
    return [base + (1 if i >= stages - extra else 0) for i in range(stages)]


FUSED_ATTENTION = True
"""Both backends use fused (flash) attention (SDPA on CUDA/CPU, the NKI kernel on Trainium),
which never stores the s x s attention scores: the 5·a·s/h term below is then 0."""


def activation_bytes_per_layer(
    seq: int,
    micro: int,
    shape: ModelShape,
    tp: int,
    sp: bool,
    mode: str,
    fused_attention: bool = FUSED_ATTENTION,
) -> float:
    """Activation bytes one layer keeps for backward (bf16), after Korthikanti et al. 2022,
    "Reducing Activation Recomputation in Large Transformer Models": s·b·h·(34 + 5·a·s/h)
    without parallelism; tensor parallel divides all of it with sequence parallel, only the
    24 + 5·a·s/h part without; selective recompute (and fused attention) drops the 5·a·s/h
    attention-score part; full recompute keeps only the layer input (2·s·b·h)."""
    sbh = seq * micro * shape.hidden_size
    attention = 5 * shape.num_heads * seq / shape.hidden_size
    if mode == "full":
        return 2 * sbh / (tp if sp else 1)
    core = 34.0 if mode == "selective" or fused_attention else 34.0 + attention
    if sp:
        return sbh * core / tp
    return sbh * (10 + (core - 10) / tp)


def memory_estimate(spec: ContinualPretrainSpec, p: Plan, shape: ModelShape) -> MemoryEstimate:
    t = spec.training
    tp, pp, dp = p.tensor_parallel, p.pipeline_parallel, max(1, p.data_parallel)
    seq, micro = spec.data.block_size, t.micro_batch_size
    if p.instance is None:
        raise RuntimeError("memory_estimate needs the layout (_layout) first")
    device: DeviceSpec = p.instance.device_spec
    layers = stage_layers(shape.num_layers, pp)
    emb = shape.embedding_params
    # The LM head lives on the last stage; with tied embeddings and PP > 1 it is a copy.
    head = shape.lm_head_params or (emb if pp > 1 else 0)
    ac = t.activation_checkpointing
    per_layer = activation_bytes_per_layer(seq, micro, shape, tp, t.sequence_parallel, ac)
    recompute = (
        activation_bytes_per_layer(seq, micro, shape, tp, t.sequence_parallel, "none")
        if ac == "full"
        else 0.0
    )
    logits = 6.0 * seq * micro * shape.vocab_size / tp  # bf16 logits + fp32 loss softmax

    candidates = []
    for idx, n_layers in enumerate(layers):
        first, last = idx == 0, idx == pp - 1
        params = n_layers * shape.layer_params + (emb if first else 0)
        params += (head + shape.hidden_size) if last else 0
        params_dev = params // tp
        # 1F1B: stage i has up to pp - i microbatches in flight (never more than exist).
        stage_inflight = min(pp - idx, max(1, p.grad_accum_steps)) if pp > 1 else 1
        act = per_layer * n_layers * stage_inflight + recompute
        act += logits if last else 0.0
        weights, grads, optim = _state_bytes(spec, p.backend or "native", params_dev, dp)
        if p.backend == "native" and dp > 1:
            # FSDP all-gathers the current and the prefetched layer in bf16 and holds one
            # layer's fp32 gradient before reduce-scatter.
            weights += 2 * 2 * shape.layer_params / tp
            grads += 4 * shape.layer_params / tp
        name = "stage 0 of 1" if pp == 1 else f"pipeline stage {idx} of {pp}"
        candidates.append(
            MemoryEstimate(
                stage=name,
                params_per_device=params_dev,
                weights=weights,
                grads=grads,
                optimizer=optim,
                activations=act,
                reserved=device.reserved_gib * GIB,
                device_bytes=None if device.memory_gib is None else device.memory_gib * GIB,
            )
        )
    return max(candidates, key=lambda m: m.total)


def _state_bytes(
    spec: ContinualPretrainSpec, backend: str, params: int, dp: int
) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per device, from the seed's 18 bytes/param for mixed
    precision AdamW: weights 6 (bf16 2 + fp32 master 4), grads 4 (fp32), Adam m and v 8.
    fp32 training has no bf16 copy (16 B). ZeRO-1 (nxd) shards master weights and optimizer
    over data parallel; FSDP (native) shards everything over data parallel."""
    t = spec.training
    mixed = t.precision == "bf16"
    low, master, grads, optim = (2.0 if mixed else 0.0), 4.0, 4.0, 8.0
    if backend == "native":
        return (low + master) * params / dp, grads * params / dp, optim * params / dp
    if t.zero1:
        return low * params + master * params / dp, grads * params, optim * params / dp
    return (low + master) * params, grads * params, optim * params
