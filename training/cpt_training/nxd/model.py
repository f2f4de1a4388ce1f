"""A thin Llama for NxD: HF parameter names, NxD parallel layers.

The modules hold exactly the parameters the NxD converter writes for a layout
(:func:`cpt_training.nxd.layout.nxd_param_names`), so ``nxd.load_checkpoint(...,
strict=True)`` loads ``pretrained_weight`` and our own tags without renaming.

The parallel layers come from a *layer kit*: :func:`nxd_kit` builds NxD's
``ParallelEmbedding`` / ``ColumnParallelLinear`` / ``RowParallelLinear`` /
``GQAQKVColumnParallelLinear`` / ``parallel_cross_entropy`` (imported inside the function, so
this module imports without neuronx_distributed). :class:`TorchKit` is the same contract with
plain torch at TP=1; tests use it to check on CPU that this model computes what HF's
``LlamaForCausalLM`` computes, including the sequence-parallel tensor layout
(``[seq, batch, hidden]`` between the parallel layers, as NxD's layers produce with
``sequence_parallel_enabled``).

The model is written to be traceable by torch.fx (NxD's pipeline partitioner): no Python
control flow on tensor values, and everything with dtype/device logic (norm, rotary, core
attention, loss) is its own module, declared a leaf to the tracer (:data:`LEAF_MODULE_NAMES`).
No buffers: rotary frequencies are computed in forward, so meta-device init has nothing to
restore.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cpt_training.nxd.layout import LlamaShape, NxdLayout, RopeSpec

LEAF_MODULE_NAMES = ["CptRMSNorm", "CptRotary", "CptCoreAttention", "CptLossHead"]
"""Class names NxDPPModel must not trace into (its tracer matches by substring)."""


class LayerKit(Protocol):
    """Factories for the tensor-parallel building blocks."""

    tp_size: int
    sequence_parallel: bool

    def embedding(self, vocab: int, hidden: int) -> nn.Module: ...

    def column(self, in_features: int, out_features: int, *, stride: int = 1) -> nn.Module: ...

    def row(self, in_features: int, out_features: int) -> nn.Module: ...

    def qkv(self, hidden: int, q_out: int, kv_out: int, kv_size_multiplier: int) -> nn.Module: ...

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss of vocab-parallel ``logits`` [N, V/tp] against ``labels`` [N]."""
        ...


@dataclass(frozen=True)
class ModelSpec:
    """Everything the model's structure depends on (pure; built by :func:`model_spec`)."""

    layout: NxdLayout
    sequence_parallel: bool = False
    upcast: torch.dtype = torch.float32
    """dtype for norm/softmax/loss math. Under ``XLA_DOWNCAST_BF16=1`` fp32 *is* bf16 on the
    device, so NxD's examples compute these in float64 (fp32 on device); we do the same."""

    @property
    def shape(self) -> LlamaShape:
        return self.layout.shape


def model_spec(
    layout: NxdLayout, *, sequence_parallel: bool, env: dict[str, str] | None = None
) -> ModelSpec:
    env = dict(os.environ) if env is None else env
    upcast = torch.float64 if env.get("XLA_DOWNCAST_BF16") == "1" else torch.float32
    sp = sequence_parallel and layout.tp > 1
    return ModelSpec(layout, sequence_parallel=sp, upcast=upcast)


# ---------------------------------------------------------------------------------------------
# Leaf modules
# ---------------------------------------------------------------------------------------------


class CptRMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, upcast: torch.dtype, sequence_parallel: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        # NxD all-reduces the grads of params marked like this over TP when SP is on.
        self.weight.sequence_parallel_enabled = sequence_parallel  # type: ignore[attr-defined]
        self.eps = eps
        self.upcast = upcast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.upcast)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(self.upcast) * h).to(x.dtype)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (float64) with the config's scaling (HF's default/linear/llama3)."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        mid = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled)
    return inv


class CptRotary(nn.Module):
    """cos/sin tables [seq, head_dim] for positions 0..seq-1."""

    def __init__(self, rope: RopeSpec, head_dim: int):
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = q.shape[-2]
        inv = rope_inv_freq(self.rope, self.head_dim).to(q.device)
        pos = torch.arange(seq, device=q.device, dtype=torch.float64)
        freqs = torch.outer(pos, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(q.dtype), emb.sin().to(q.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class CptCoreAttention(nn.Module):
    """Causal softmax attention on [batch, heads, seq, head_dim] (the piece selective
    activation checkpointing recomputes)."""

    def __init__(self, upcast: torch.dtype):
        super().__init__()
        self.upcast = upcast

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        seq = q.shape[-2]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        mask = torch.ones(seq, seq, device=q.device, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=self.upcast).to(q.dtype)
        return torch.matmul(probs, v)


class CptLossHead(nn.Module):
    """Next-token loss from vocab-parallel logits; labels of -100 are ignored.

    ``reduction`` is "mean" (training) or "sum": the held-out evaluation sums, because NxD's
    pipeline averages per-micro-batch losses, which loses the target counts when padding
    rows leave micro-batches partly empty; sums stay exact (:func:`set_loss_reduction`).
    """

    def __init__(self, kit: LayerKit, upcast: torch.dtype):
        super().__init__()
        self._kit = [kit]  # not a submodule
        self.upcast = upcast
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shift_logits = logits[:, :-1, :].to(self.upcast).contiguous()
        shift_labels = labels[:, 1:].contiguous()
        flat_logits = shift_logits.view(-1, shift_logits.shape[-1])
        flat_labels = shift_labels.view(-1)
        per_token = self._kit[0].cross_entropy(flat_logits, flat_labels)
        valid = (flat_labels != -100).to(per_token.dtype)
        summed = (per_token * valid).sum()
        if self.reduction == "sum":
            return summed
        return summed / valid.sum().clamp_min(1.0)


def set_loss_reduction(model: nn.Module, reduction: str) -> int:
    """Set every :class:`CptLossHead` of ``model`` (NxD's wrapper lists only this rank's
    pipeline stages: ranks without the last stage have none) to "mean" or "sum"; returns how
    many it set. A Python attribute of a leaf module, so the traced pipeline follows it."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    heads = [m for m in model.modules() if isinstance(m, CptLossHead)]
    for head in heads:
        head.reduction = reduction
    return len(heads)


# ---------------------------------------------------------------------------------------------
# The transformer
# ---------------------------------------------------------------------------------------------


class CptAttention(nn.Module):
    def __init__(self, spec: ModelSpec, kit: LayerKit):
        super().__init__()
        lay, s = spec.layout, spec.shape
        self.sp, self.tp = spec.sequence_parallel, lay.tp
        self.hd = s.head_dim
        self.nh, self.nkv = lay.heads_per_rank, lay.kv_heads_per_rank
        self.mode = "qkv_linear" if lay.qkv_linear else "fused" if lay.coalesce_qkv else "split"
        q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
        if self.mode == "qkv_linear":
            self.qkv_proj = kit.qkv(s.hidden, q_out, kv_out, lay.kv_size_multiplier)
        elif self.mode == "fused":
            self.qkv_proj = kit.column(s.hidden, 3 * q_out, stride=3)
        else:
            self.q_proj = kit.column(s.hidden, q_out)
            self.k_proj = kit.column(s.hidden, kv_out)
            self.v_proj = kit.column(s.hidden, kv_out)
        self.o_proj = kit.row(q_out, s.hidden)
        self.rotary = CptRotary(s.rope, s.head_dim)
        self.core_attn = CptCoreAttention(spec.upcast)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if self.sp:  # [seq, batch, n*hd] -> [batch, n, seq, hd]
            return x.view(x.shape[0], x.shape[1], n, self.hd).permute(1, 2, 0, 3)
        return x.view(x.shape[0], x.shape[1], n, self.hd).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "qkv_linear":
            q, k, v = self.qkv_proj(x)
        elif self.mode == "fused":
            local = self.nh * self.hd
            q, k, v = self.qkv_proj(x).split(local, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = self._heads(q, self.nh), self._heads(k, self.nkv), self._heads(v, self.nkv)
        cos, sin = self.rotary(q)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        groups = self.nh // self.nkv
        if groups > 1:  # local query head i uses local KV head i // groups (HF's repeat_kv)
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = self.core_attn(q, k, v)  # [batch, nh, seq, hd]
        if self.sp:
            out = out.permute(2, 0, 1, 3)
            out = out.reshape(out.shape[0], out.shape[1], self.nh * self.hd)
        else:
            out = out.transpose(1, 2)
            out = out.reshape(out.shape[0], out.shape[1], self.nh * self.hd)
        return self.o_proj(out)  # type: ignore[no-any-return]


class CptMLP(nn.Module):
    def __init__(self, spec: ModelSpec, kit: LayerKit):
        super().__init__()
        s = spec.shape
        self.local = s.intermediate // spec.layout.tp
        self.gate_up_proj = kit.column(s.hidden, 2 * s.intermediate, stride=2)
        self.down_proj = kit.row(s.intermediate, s.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.local, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # type: ignore[no-any-return]


class CptDecoderLayer(nn.Module):
    """The unit of pipeline cuts and full activation checkpointing."""

    def __init__(self, spec: ModelSpec, kit: LayerKit):
        super().__init__()
        s = spec.shape
        self.self_attn = CptAttention(spec, kit)
        self.mlp = CptMLP(spec, kit)
        norm = (s.hidden, s.rms_norm_eps, spec.upcast, spec.sequence_parallel)
        self.input_layernorm = CptRMSNorm(*norm)
        self.post_attention_layernorm = CptRMSNorm(*norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class CptLlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, kit: LayerKit):
        super().__init__()
        s = spec.shape
        self.embed_tokens = kit.embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(CptDecoderLayer(spec, kit) for _ in range(s.num_layers))
        self.norm = CptRMSNorm(s.hidden, s.rms_norm_eps, spec.upcast, spec.sequence_parallel)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)  # type: ignore[no-any-return]


class CptLlamaForCausalLM(nn.Module):
    """``forward(input_ids, labels) -> loss`` (training only; export goes through HF)."""

    def __init__(self, spec: ModelSpec, kit: LayerKit):
        super().__init__()
        s = spec.shape
        self.spec = spec
        self.model = CptLlamaModel(spec, kit)
        self.lm_head = kit.column(s.hidden, s.vocab)
        if s.tie_word_embeddings:  # plan_layout guarantees pp == 1 here
            self.lm_head.weight = self.model.embed_tokens.weight
        self.loss_head = CptLossHead(kit, spec.upcast)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [batch, seq, vocab/tp]."""
        logits = self.lm_head(self.model(input_ids))
        if self.spec.sequence_parallel:
            logits = logits.transpose(0, 1)
        return logits  # type: ignore[no-any-return]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_head(self.logits(input_ids), labels)  # type: ignore[no-any-return]


def build_model(spec: ModelSpec, kit: LayerKit) -> CptLlamaForCausalLM:
    return CptLlamaForCausalLM(spec, kit)


def init_weights(module: nn.Module, device: Any = None) -> None:
    """NxD ``param_init_fn`` for meta-device init: give each freshly materialised module
    finite values (the pretrained load overwrites them)."""
    if isinstance(module, CptRMSNorm):
        module.reset_parameters()
    elif hasattr(module, "init_weight_cpu"):  # ParallelEmbedding / Column / RowParallelLinear
        getattr(module, "init_weight_cpu")()  # noqa: B009 (an attribute torch types as Tensor)
    elif hasattr(module, "initialize_weight_biases"):  # GQAQKVColumnParallelLinear
        getattr(module, "initialize_weight_biases")()  # noqa: B009


def activation_checkpoint_classes(mode: str, seq_len: int) -> tuple[type[nn.Module], ...] | None:
    """What NxD wraps in activation checkpointing: whole layers ("full"), the attention core
    ("selective"; plus the MLP from 8k tokens on, where its activations dominate, as NxD's
    70B recipe does), or nothing. Classes, not "full": NxD resolves "full" only for HF
    models or under PP."""
    if mode == "none":
        return None
    if mode == "full":
        return (CptDecoderLayer,)
    if mode == "selective":
        return (CptCoreAttention, CptMLP) if seq_len >= 8192 else (CptCoreAttention,)
    raise ValueError(f"activationCheckpointing {mode!r}; allowed: none, full, selective")


# ---------------------------------------------------------------------------------------------
# Kits
# ---------------------------------------------------------------------------------------------


class _TorchQKV(nn.Module):
    def __init__(self, hidden: int, q_out: int, kv_out: int):
        super().__init__()
        self.weight_q = nn.Parameter(torch.empty(q_out, hidden))
        self.weight_k = nn.Parameter(torch.empty(kv_out, hidden))
        self.weight_v = nn.Parameter(torch.empty(kv_out, hidden))
        for w in (self.weight_q, self.weight_k, self.weight_v):
            nn.init.normal_(w, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return F.linear(x, self.weight_q), F.linear(x, self.weight_k), F.linear(x, self.weight_v)


class _SeqFirstEmbedding(nn.Embedding):
    """TP=1 stand-in for ParallelEmbedding with sequence parallelism: [seq, batch, hidden]."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input).transpose(0, 1)


class TorchKit:
    """The layer-kit contract in plain torch at TP=1 (CPU tests, dry runs). With
    ``sequence_parallel`` it reproduces NxD's seq-first activation layout."""

    tp_size = 1

    def __init__(self, sequence_parallel: bool = False):
        self.sequence_parallel = sequence_parallel

    def embedding(self, vocab: int, hidden: int) -> nn.Module:
        cls = _SeqFirstEmbedding if self.sequence_parallel else nn.Embedding
        return cls(vocab, hidden)

    def column(self, in_features: int, out_features: int, *, stride: int = 1) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def qkv(self, hidden: int, q_out: int, kv_out: int, kv_size_multiplier: int) -> nn.Module:
        return _TorchQKV(hidden, q_out, kv_out * kv_size_multiplier)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)


def nxd_kit(*, sequence_parallel: bool, dtype: torch.dtype = torch.float32) -> LayerKit:
    """NxD's parallel layers (needs neuronx_distributed and an initialised model-parallel
    state: call after ``neuronx_distributed_config``)."""
    from neuronx_distributed.modules.qkv_linear import GQAQKVColumnParallelLinear
    from neuronx_distributed.parallel_layers import parallel_state
    from neuronx_distributed.parallel_layers.layers import (
        ColumnParallelLinear,
        ParallelEmbedding,
        RowParallelLinear,
    )
    from neuronx_distributed.parallel_layers.loss_functions import parallel_cross_entropy

    tp = parallel_state.get_tensor_model_parallel_size()
    sp = sequence_parallel and tp > 1

    class _NxdKit:
        tp_size = tp
        sequence_parallel = sp

        def embedding(self, vocab: int, hidden: int) -> nn.Module:
            layer: nn.Module = ParallelEmbedding(
                vocab, hidden, sequence_parallel_enabled=sp, dtype=dtype
            )
            return layer

        def column(self, in_features: int, out_features: int, *, stride: int = 1) -> nn.Module:
            layer: nn.Module = ColumnParallelLinear(
                in_features,
                out_features,
                bias=False,
                gather_output=False,
                stride=stride,
                sequence_parallel_enabled=sp,
                dtype=dtype,
            )
            return layer

        def row(self, in_features: int, out_features: int) -> nn.Module:
            layer: nn.Module = RowParallelLinear(
                in_features,
                out_features,
                bias=False,
                input_is_parallel=True,
                sequence_parallel_enabled=sp,
                dtype=dtype,
            )
            return layer

        def qkv(self, hidden: int, q_out: int, kv_out: int, kv_size_multiplier: int) -> nn.Module:
            layer: nn.Module = GQAQKVColumnParallelLinear(
                hidden,
                [q_out, kv_out],
                bias=False,
                gather_output=False,
                sequence_parallel_enabled=sp,
                kv_size_multiplier=kv_size_multiplier,
                fuse_qkv=False,  # keep weight_q/k/v: the converter's names without --fuse_qkv
                dtype=dtype,
            )
            return layer

        def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return parallel_cross_entropy(logits, labels)  # type: ignore[no-any-return]

    return _NxdKit()
