"""A lean Llama decoder for training, with Hugging Face state-dict names.

Why not ``transformers.LlamaForCausalLM`` itself: the HF module carries generation, cache and
masking machinery that costs time on every step (mask construction, output dataclasses,
``**kwargs`` plumbing) and makes per-block ``torch.compile`` and selective activation
checkpointing awkward; its loss upcasts the full logits tensor outside any fused region. This
module keeps only the training path (embedding -> N x [RMSNorm, GQA attention via SDPA with a
causal flag, RMSNorm, SwiGLU MLP] -> RMSNorm -> LM head -> summed cross entropy), and names every
parameter exactly as HF does (``model.layers.3.self_attn.q_proj.weight`` ...), so HF safetensors
load into it and export out of it without a mapping table. The rotary tables come from
transformers' own rotary module run at each sequence length (:func:`rope_table`), so every rope
type HF supports for Llama (default, linear, dynamic, yarn, longrope, llama3, ...) gives HF's
positions exactly, past every length threshold too. ``tests/parity/`` proves logits identical
to HF's in fp32 for every variant the backend accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from cpt_training.native.options import unsupported_options

ActivationCheckpointing = Literal["none", "full", "selective"]

IGNORE_INDEX = -100


@dataclass(frozen=True, slots=True)
class LlamaArgs:
    """The shape of a Llama model, read from an HF ``LlamaConfig``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, config: Any) -> LlamaArgs:
        """The shape, after refusing any option this module would not reproduce exactly
        (:func:`cpt_training.native.options.unsupported_options`, which the planner runs too
        where it can read config.json)."""
        bad = unsupported_options({"model_type": None, **config.to_dict()})
        if bad:
            raise ValueError(
                "the native backend cannot train this model exactly as transformers runs it: "
                + "; ".join(f"config.json {field}: {why}" for field, why in bad)
            )
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        if heads % kv_heads:
            raise ValueError(
                f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                f"({kv_heads})"
            )
        return cls(
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            max_position_embeddings=int(config.max_position_embeddings),
        )

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        """Parameter count computed from the shape (the tied matrix is counted once)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads) + h
        mlp = 3 * h * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + h
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        total = self.num_layers * per_layer + h + emb + head
        if exclude_embedding and not self.tie_word_embeddings:
            total -= emb
        return total


RopeTable = tuple[torch.Tensor, torch.Tensor]


def rope_table(hf_config: Any, seq_len: int, device: torch.device | str) -> RopeTable:
    """cos/sin of positions ``0..seq_len-1``, shape [seq_len, head_dim], fp32, from
    transformers' own ``LlamaRotaryEmbedding`` run as an HF forward over ``seq_len`` tokens runs
    it: built on the CPU (as HF builds it), moved to ``device``, called with
    ``position_ids = arange(seq_len)``.

    Why HF's module and not its inverse frequencies alone: some rope types depend on the
    sequence length at every forward (``dynamic`` recomputes the frequencies for sequences past
    ``max_position_embeddings``; ``longrope`` switches to its long factors past
    ``original_max_position_embeddings``). Taking the table from the module HF runs makes every
    rope type transformers supports for Llama identical by construction, including ones added
    later. A fresh module per length gives what a freshly loaded HF model computes at that
    length; in training every step has the same length, where HF's dynamic state (it keeps the
    longest length seen) gives the same table too."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("cpu"):
        rope = LlamaRotaryEmbedding(config=hf_config)
    rope.to(device)
    x = torch.zeros(1, dtype=torch.float32, device=device)
    pos = torch.arange(seq_len, device=device).unsqueeze(0)
    cos, sin = rope(x, pos)
    return cos[0].float(), sin[0].float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D] (fp32, cast to x's dtype like HF)."""
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, scaled in the weight's dtype (HF ``LlamaRMSNorm`` numerics)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.head_dim = a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.attention_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.attention_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.attention_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds num_heads / tp of them.
        q = self.q_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        groups = q.shape[1] // k.shape[1]
        if groups > 1 and not q.is_cuda:
            # Explicit repeat keeps every backend eligible (Neuron's, CPU's fused kernels).
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        # On CUDA the grouped K/V go in as they are: cuDNN's attention reads them per group, no
        # repeated copies (about 6 ms of a 1B step at micro 8 on one H100: kernels-h100.json).
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=groups > 1 and q.is_cuda
        )
        proj: torch.Tensor = self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))
        return proj


class MLP(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


# Ops whose outputs selective checkpointing keeps: the matmuls and attention. Everything else in
# a block (norms, rope, SiLU, residual adds) is cheap, memory-bound and recomputed in backward.
_SAVE_OPS: set[Any] = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in _SAVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> Any:
    return create_selective_checkpoint_contexts(_selective_policy)  # type: ignore[no-untyped-call]


class DecoderLayer(nn.Module):
    """One transformer block. Activation checkpointing and compilation are applied inside
    ``forward`` (not by wrapper modules) so parameter names stay HF's."""

    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)
        self.ac: ActivationCheckpointing = "none"
        self._impl: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = (
            self._checkpointed
        )

    def _body(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = x + self.self_attn(self.input_layernorm(x), cos, sin)
        out: torch.Tensor = h + self.mlp(self.post_attention_layernorm(h))
        return out

    def _checkpointed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.ac == "none" or not torch.is_grad_enabled():
            return self._body(x, cos, sin)
        if self.ac == "full":
            out = checkpoint(self._body, x, cos, sin, use_reentrant=False)
        else:
            out = checkpoint(
                self._body, x, cos, sin, use_reentrant=False, context_fn=_selective_context
            )
        assert isinstance(out, torch.Tensor)
        return out

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile this block's math (including its checkpoint region) in place."""
        self._impl = torch.compile(self._checkpointed, *args, **kwargs)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._impl(x, cos, sin)


class LlamaBody(nn.Module):
    """HF's ``LlamaModel`` part: ``model.embed_tokens``, ``model.layers.N``, ``model.norm``."""

    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class Llama(nn.Module):
    """Causal LM. ``forward(input_ids, targets)`` returns the *summed* token cross entropy
    (callers divide by the number of target tokens, which they know without a host sync)."""

    def __init__(self, a: LlamaArgs, hf_config: Any) -> None:
        super().__init__()
        self.args = a
        self.model = LlamaBody(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._hf_config = hf_config
        self._rope: dict[tuple[str, int], RopeTable] = {}
        self._head_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._loss

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> Llama:
        return cls(LlamaArgs.from_hf(hf_config), hf_config)

    def set_activation_checkpointing(self, mode: ActivationCheckpointing) -> None:
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.ac = mode

    def compile_blocks(self, **kwargs: Any) -> None:
        """Compile each block and the head+loss separately (identical blocks share one graph)."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.compile(**kwargs)
        self._head_loss = torch.compile(self._loss, **kwargs)

    def use_fused_loss(self, *, compiled: bool) -> None:
        """Head + loss through ``native/loss.py`` (no whole-vocabulary logits held)."""
        from cpt_training.native.loss import chunked_linear_cross_entropy

        norm: Callable[[torch.Tensor], torch.Tensor] = self.model.norm
        if compiled:
            norm = torch.compile(self.model.norm)

        def fused(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return chunked_linear_cross_entropy(
                norm(h), self.lm_head.weight, targets, compiled=compiled
            )

        self._head_loss = fused

    def _rope_for(self, seq: int, device: torch.device) -> RopeTable:
        # Cached per (device, seq): a plain dict, not buffers, so nothing leaks into the state
        # dict and meta-device construction needs no re-initialisation.
        key = (str(device), seq)
        if key not in self._rope:
            self._rope[key] = rope_table(self._hf_config, seq, device)
        return self._rope[key]

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        cos, sin = self._rope_for(input_ids.shape[1], input_ids.device)
        h: torch.Tensor = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return h

    def _loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.norm(h))
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.model.norm(self.hidden(input_ids)))
        return out

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._head_loss(self.hidden(input_ids), targets)


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t predicts labels[t + 1]; the last position has none.

    Same convention as HF's causal-LM loss, so losses are comparable with ``model(labels=...)``.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
