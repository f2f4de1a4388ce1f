"""The NxD checkpoint layout of a Llama: names, shards, pipeline stages. Pure.

NxD's checkpoint converter (``neuronx_distributed.scripts.checkpoint_converter``, read at the
2.28/2.29 releases) turns one full HF state dict into per-rank files
``model/dp_rank_00_tp_rank_XX_pp_rank_YY.pt`` and back. This module states that mapping for
the Llama layouts cpt trains, so that

* the trainer's model (``nxd.model``) has exactly the parameter names and local shapes the
  converter writes (``load_checkpoint(strict=True)`` needs that), and
* a pure-torch reference (:func:`shard_full_state` / :func:`merge_shards`) lets the tests check
  the layout numerically without the hardware: HF -> shards -> HF round trips, and a TP-sharded
  attention computed rank by rank equals the full one (so each rank's query heads really meet
  their own key/value heads).

The production path always runs the real converter; the reference is the specification the
tests hold the model code to. It mirrors the converter's trn1 branch (``hw_backend=trn1``,
no head padding, no fused ``weight_qkv``), which is what cpt's nxd backend uses.

The mapping (TP = tensor-parallel degree, per rank ``r``):

* ``embed_tokens``, ``lm_head``: rows (vocab) split in TP chunks.
* ``o_proj``, ``down_proj``: columns split (RowParallelLinear).
* ``gate_proj`` + ``up_proj`` -> ``gate_up_proj`` = ``cat(gate_r, up_r)`` per rank.
* q/k/v, three layouts:
  - ``qkv_linear`` (GQAQKVColumnParallelLinear): ``qkv_proj.weight_q/k/v``. K/V heads are
    repeated ``kv_size_multiplier`` times and split, so rank ``r`` holds KV head ``r % KV``;
    the query heads are regrouped so that rank ``r`` holds query group
    ``(r % KV) * mult + r // KV`` (groups of ``H / TP`` heads in HF order), and ``o_proj``'s
    columns get the same regrouping. The converter requires ``KV * mult == TP`` on trn1.
  - GQA without qkv_linear: ``q_proj``/``k_proj``/``v_proj`` rows split (needs ``KV % TP == 0``).
  - MHA without qkv_linear: per rank ``qkv_proj.weight = cat(q_r, k_r, v_r)`` (the converter's
    ``--coalesce_qkv``; its merge path cannot rebuild separate q/k/v shards of an MHA model).
* norms: replicated. PP: embeddings on the first stage, ``model.norm``/``lm_head`` on the last,
  decoder layers split evenly with the remainder on the later stages (``create_partitions``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SHARD_FILE_RE = re.compile(r"^dp_rank_(\d+)_tp_rank_(\d+)_pp_rank_(\d+)\.pt$")
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def shard_file_name(tp_rank: int, pp_rank: int, dp_rank: int = 0) -> str:
    """NxD's per-rank file name (the model is saved by DP rank 0 only)."""
    return f"dp_rank_{dp_rank:02d}_tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}.pt"


# ---------------------------------------------------------------------------------------------
# Which rank reads which checkpoint files (restore downloads only a node's own files)
# ---------------------------------------------------------------------------------------------

RANK_FILE_RE = re.compile(
    r"^(?P<kind>model|optim)/dp_rank_(?P<dp>\d+)_tp_rank_(?P<tp>\d+)_pp_rank_(?P<pp>\d+)\.pt"
    r"(?:\.info\.pt|\.tensors/.+)?$"
)
"""A per-rank file of an NxD tag, with its xser companions (``.pt.info.pt``, ``.pt.tensors/``)."""
_EP_FILE_RE = re.compile(r"^(?:model|optim)/dp_rank_\d+_ep_rank_")


@dataclass(frozen=True)
class RankCoords:
    """A global rank's place in NxD's parallel grid."""

    tp: int
    pp: int
    dp: int


def nxd_rank_coords(
    rank: int, *, world_size: int, tp: int, pp: int, local_world_size: int | None = None
) -> RankCoords:
    """NxD's rank grid on trn1 (``parallel_state.initialize_model_parallel``, SDK 2.28/2.29;
    no context or expert parallelism, which cpt does not use).

    Global ranks fill a ``[PP, DP, TP]`` grid row-major: TP ranks are consecutive (a node's
    32 cores hold whole TP groups), then DP, then PP. TP=4 on trn1 is NxD's special case: TP
    groups are strided by ``local_world_size / 4`` inside a node so that they stay on locally
    connected cores, i.e. within each block of ``local_world_size`` ranks the grid is
    ``[TP, DP_local]`` instead of ``[DP_local, TP]``."""
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not a multiple of TP x PP ({tp} x {pp})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    dp = world_size // (tp * pp)
    p, rest = divmod(rank, dp * tp)
    if tp == 4:
        lws = local_world_size if local_world_size else world_size
        per_node = lws // tp
        if per_node < 1 or lws % tp or dp % per_node:
            raise ValueError(
                f"TP=4 on trn1 needs the local world size ({lws}) to be a multiple of 4 and "
                f"DP ({dp}) a multiple of local world size / 4"
            )
        block, inner = divmod(rest, tp * per_node)
        t, local = divmod(inner, per_node)
        return RankCoords(tp=t, pp=p, dp=block * per_node + local)
    d, t = divmod(rest, tp)
    return RankCoords(tp=t, pp=p, dp=d)


def nxd_rank_files(paths: Iterable[str], coords: RankCoords, *, zero1: bool) -> set[str] | None:
    """The files of an NxD tag that the rank at ``coords`` reads in ``load_checkpoint``, or
    None when the tag's layout is not one this function knows (the caller then takes all).

    A rank reads ``model/dp_rank_00_tp_<tp>_pp_<pp>.pt`` (the model is saved by DP rank 0) and
    ``optim/dp_rank_<dp or 00>_tp_<tp>_pp_<pp>.pt`` (ZeRO-1: its own DP shard; otherwise DP
    rank 0's copy), each with its xser companions if any. Every file that is not a per-rank
    shard (``checkpoint``, ``done``, ``user_content.pt``, ``config.json``, a DCP optimizer
    directory…) is taken by every rank: unknown files are never skipped."""
    index = _shard_index(paths if isinstance(paths, frozenset) else frozenset(paths))
    if index is None:
        return None  # expert parallelism: names this function does not model
    shared, shards = index
    out = set(shared)
    for kind, dp in (("model", 0), ("optim", coords.dp if zero1 else 0)):
        if not any(k[0] == kind for k in shards):
            continue  # e.g. no optimizer in pretrained_weight
        mine = shards.get((kind, dp, coords.tp, coords.pp))
        if not mine:
            return None  # shards exist but not this rank's: another layout (caller takes all)
        out.update(mine)
    return out


_ShardIndex = tuple[tuple[str, ...], dict[tuple[str, int, int, int], list[str]]]


@functools.lru_cache(maxsize=4)
def _shard_index(paths: frozenset[str]) -> _ShardIndex | None:
    """(non-shard files, shard files by (kind, dp, tp, pp)), parsed once per tag: every rank
    of a node asks about the same ~1000 names."""
    shared: list[str] = []
    shards: dict[tuple[str, int, int, int], list[str]] = {}
    for path in paths:
        if _EP_FILE_RE.match(path):
            return None
        m = RANK_FILE_RE.match(path)
        if m is None:
            shared.append(path)
        else:
            key = (m["kind"], int(m["dp"]), int(m["tp"]), int(m["pp"]))
            shards.setdefault(key, []).append(path)
    return tuple(shared), shards


# ---------------------------------------------------------------------------------------------
# Model shape and rotary settings from a HF config.json
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaShape:
    """The numbers of a Llama config that the layout and the model depend on."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope: RopeSpec = RopeSpec(theta=10000.0)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def is_gqa(self) -> bool:
        return self.kv_heads != self.heads

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LlamaShape:
        """From a HF ``config.json`` dict (transformers 4.x or 5.x spelling of rope)."""
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"model_type {model_type!r} is not supported by nxd; allowed: llama")
        for key in ("attention_bias", "mlp_bias"):
            if config.get(key):
                raise ValueError(f"{key}=true is not supported by the nxd backend (no biases)")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.get('hidden_act')!r} unsupported; allowed: silu")
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            shape = cls(
                num_layers=int(config["num_hidden_layers"]),
                hidden=hidden,
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                rope=_rope_from_config(config),
            )
        except KeyError as exc:
            raise ValueError(f"config.json lacks {exc.args[0]!r}") from None
        head_dim = config.get("head_dim")
        if head_dim is not None and int(head_dim) != hidden // heads:
            raise ValueError(
                f"head_dim {head_dim} != hidden_size/num_attention_heads ({hidden // heads}): "
                "the NxD converter assumes head_dim = hidden_size / num_attention_heads"
            )
        if hidden % heads or heads % shape.kv_heads:
            raise ValueError("hidden_size must divide by heads, heads by num_key_value_heads")
        return shape


def _rope_from_config(config: dict[str, Any]) -> RopeSpec:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    src = params if params.get("rope_type", "default") != "default" else scaling
    kind = str(src.get("rope_type", src.get("type", "default")) or "default")
    if kind == "default":
        return RopeSpec(theta=theta)
    if kind == "linear":
        return RopeSpec(theta=theta, kind="linear", factor=float(src["factor"]))
    if kind == "llama3":
        return RopeSpec(
            theta=theta,
            kind="llama3",
            factor=float(src["factor"]),
            low_freq_factor=float(src.get("low_freq_factor", 1.0)),
            high_freq_factor=float(src.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(src["original_max_position_embeddings"]),
        )
    raise ValueError(
        f"rope type {kind!r} is not supported by nxd; allowed: default, linear, llama3"
    )


# ---------------------------------------------------------------------------------------------
# The parallel layout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NxdLayout:
    """How one Llama is split over TP x PP ranks, validated against what both NxD's layers and
    its converter accept."""

    shape: LlamaShape
    tp: int
    pp: int
    kv_size_multiplier: int = 1
    qkv_linear: bool = False
    hw_backend: str = "trn1"

    @property
    def coalesce_qkv(self) -> bool:
        """MHA without qkv_linear: q/k/v travel fused per rank as ``qkv_proj.weight``."""
        return not self.qkv_linear and not self.shape.is_gqa

    @property
    def heads_per_rank(self) -> int:
        return self.shape.heads // self.tp

    @property
    def kv_heads_per_rank(self) -> int:
        return self.shape.kv_heads * self.kv_size_multiplier // self.tp

    def stage_of_layer(self, layer: int) -> int:
        return stage_of_layer(layer, self.shape.num_layers, self.pp)

    def layers_of_stage(self, stage: int) -> range:
        bounds = stage_bounds(self.shape.num_layers, self.pp)
        return range(bounds[stage], bounds[stage + 1])

    def q_group_of_rank(self, rank: int) -> int:
        """qkv_linear: the HF query group (``heads/TP`` heads) that TP rank ``rank`` holds."""
        kv = self.shape.kv_heads
        return (rank % kv) * self.kv_size_multiplier + rank // kv


def plan_layout(
    shape: LlamaShape,
    *,
    tp: int,
    pp: int,
    kv_size_multiplier: int = 1,
    qkv_linear: bool = False,
    hw_backend: str = "trn1",
) -> NxdLayout:
    """Validate a layout; every error names the knob and what would work."""
    if tp < 1 or pp < 1:
        raise ValueError("tensorParallel and pipelineParallel must be >= 1")
    if hw_backend not in ("trn1", "trn2"):
        raise ValueError(f"hwBackend {hw_backend!r} unsupported; allowed: trn1, trn2")
    if shape.num_layers < pp:
        raise ValueError(
            f"pipelineParallel={pp} exceeds num_hidden_layers={shape.num_layers}; "
            "each stage needs at least one layer"
        )
    for what, n in (
        ("num_attention_heads", shape.heads),
        ("vocab_size", shape.vocab),
        ("intermediate_size", shape.intermediate),
    ):
        if n % tp:
            raise ValueError(f"tensorParallel={tp} must divide {what}={n}")
    if shape.tie_word_embeddings and pp > 1:
        raise ValueError(
            "tie_word_embeddings=true needs pipelineParallel=1 on nxd (the embedding and the "
            "LM head would live on different stages)"
        )
    kv = shape.kv_heads
    if qkv_linear:
        if kv_size_multiplier < 1 or tp % kv_size_multiplier:
            raise ValueError(
                f"kvSizeMultiplier={kv_size_multiplier} must be >= 1 and divide tensorParallel={tp}"
            )
        if hw_backend == "trn1" and kv * kv_size_multiplier != tp:
            raise ValueError(
                f"qkvLinear on trn1 needs num_key_value_heads x kvSizeMultiplier == "
                f"tensorParallel ({kv} x {kv_size_multiplier} != {tp}); use "
                f"kvSizeMultiplier={tp // kv if tp % kv == 0 and tp >= kv else '?'}"
                + ("" if tp >= kv else f", or qkvLinear=false (tensorParallel < {kv} KV heads)")
            )
    else:
        if kv_size_multiplier != 1:
            raise ValueError("kvSizeMultiplier > 1 needs qkvLinear=true (KV head replication)")
        if shape.is_gqa and kv % tp:
            raise ValueError(
                f"tensorParallel={tp} must divide num_key_value_heads={kv} without qkvLinear; "
                f"set qkvLinear=true with kvSizeMultiplier={max(1, tp // kv)} to replicate "
                "KV heads"
            )
    return NxdLayout(shape, tp, pp, kv_size_multiplier, qkv_linear, hw_backend)


def stage_bounds(num_layers: int, pp: int) -> list[int]:
    """First layer of each stage, plus ``num_layers``: even split, remainder to later stages
    (the rule of NxD's ``create_partitions``, which the converter and ``auto_partition`` share)."""
    base, rem = divmod(num_layers, pp)
    sizes = [base + (1 if s >= pp - rem else 0) for s in range(pp)]
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


def stage_of_layer(layer: int, num_layers: int, pp: int) -> int:
    bounds = stage_bounds(num_layers, pp)
    for stage in range(pp):
        if bounds[stage] <= layer < bounds[stage + 1]:
            return stage
    raise ValueError(f"layer {layer} out of range for {num_layers} layers")


# ---------------------------------------------------------------------------------------------
# Parameter names
# ---------------------------------------------------------------------------------------------

_ATTN_HF = ("q_proj", "k_proj", "v_proj")


def nxd_param_names(layout: NxdLayout, pp_rank: int) -> list[str]:
    """The parameter names a PP stage holds, in NxD naming (== the converter's output keys)."""
    names: list[str] = []
    if pp_rank == 0:
        names.append("model.embed_tokens.weight")
    for i in layout.layers_of_stage(pp_rank):
        p = f"model.layers.{i}"
        if layout.qkv_linear:
            names += [f"{p}.self_attn.qkv_proj.weight_{x}" for x in "qkv"]
        elif layout.coalesce_qkv:
            names.append(f"{p}.self_attn.qkv_proj.weight")
        else:
            names += [f"{p}.self_attn.{x}.weight" for x in _ATTN_HF]
        names += [
            f"{p}.self_attn.o_proj.weight",
            f"{p}.mlp.gate_up_proj.weight",
            f"{p}.mlp.down_proj.weight",
            f"{p}.input_layernorm.weight",
            f"{p}.post_attention_layernorm.weight",
        ]
    if pp_rank == layout.pp - 1:
        names += ["model.norm.weight", "lm_head.weight"]
    return names


def hf_param_names(shape: LlamaShape) -> list[str]:
    """The full HF state-dict keys (``lm_head.weight`` always present: nxd unties on input)."""
    names = ["model.embed_tokens.weight"]
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        names += [f"{p}.self_attn.{x}.weight" for x in (*_ATTN_HF, "o_proj")]
        names += [f"{p}.mlp.{x}.weight" for x in ("gate_proj", "up_proj", "down_proj")]
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
    return [*names, "model.norm.weight", "lm_head.weight"]


# ---------------------------------------------------------------------------------------------
# Reference sharder / merger (pure torch; the converter's trn1 mapping)
# ---------------------------------------------------------------------------------------------


def _chunk(t: torch.Tensor, n: int, dim: int) -> list[torch.Tensor]:
    if t.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split in {n}")
    return [c.clone() for c in t.chunk(n, dim=dim)]


def _q_shards(layout: NxdLayout, w: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """Query rows (dim 0) / o_proj columns (dim 1), regrouped per rank for qkv_linear."""
    tp = layout.tp
    groups = _chunk(w, tp, dim)  # HF order: group g = heads [g*H/TP, (g+1)*H/TP)
    if not layout.qkv_linear:
        return groups
    if layout.hw_backend != "trn1":
        raise NotImplementedError("the reference layout covers hw_backend=trn1 only")
    return [groups[layout.q_group_of_rank(r)] for r in range(tp)]


def _q_merge(layout: NxdLayout, shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    import torch

    if not layout.qkv_linear:
        return torch.cat(shards, dim=dim)
    by_group = {layout.q_group_of_rank(r): s for r, s in enumerate(shards)}
    return torch.cat([by_group[g] for g in range(layout.tp)], dim=dim)


def _kv_shards(layout: NxdLayout, w: torch.Tensor) -> list[torch.Tensor]:
    if layout.qkv_linear:
        return _chunk(w.repeat(layout.kv_size_multiplier, 1), layout.tp, 0)
    return _chunk(w, layout.tp, 0)


def _kv_merge(layout: NxdLayout, shards: list[torch.Tensor]) -> torch.Tensor:
    import torch

    full = torch.cat(shards, dim=0)
    if layout.qkv_linear:
        # replicas are identical; like the converter, keep the first copy
        return full.chunk(layout.kv_size_multiplier, dim=0)[0].clone()
    return full


def _shard_layer_param(
    layout: NxdLayout, rest: str, w: torch.Tensor, full_layer: dict[str, torch.Tensor]
) -> dict[str, list[torch.Tensor]]:
    """NxD name -> per-TP-rank tensors for one HF layer parameter (``rest`` = name after
    ``model.layers.N.``). gate/up and coalesced q/k/v are emitted by their first member."""
    import torch

    tp = layout.tp
    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return {rest: [w.clone() for _ in range(tp)]}
    if rest == "self_attn.o_proj.weight":
        return {rest: _q_shards(layout, w, 1)}
    if rest == "mlp.down_proj.weight":
        return {rest: _chunk(w, tp, 1)}
    if rest == "mlp.gate_proj.weight":
        gate, up = _chunk(w, tp, 0), _chunk(full_layer["mlp.up_proj.weight"], tp, 0)
        return {
            "mlp.gate_up_proj.weight": [torch.cat([g, u]) for g, u in zip(gate, up, strict=True)]
        }
    if rest == "mlp.up_proj.weight":
        return {}
    if rest.startswith("self_attn.") and rest.split(".")[1] in _ATTN_HF:
        which = rest.split(".")[1][0]  # q | k | v
        if layout.coalesce_qkv:
            if which != "q":
                return {}
            q = _chunk(w, tp, 0)
            k = _chunk(full_layer["self_attn.k_proj.weight"], tp, 0)
            v = _chunk(full_layer["self_attn.v_proj.weight"], tp, 0)
            return {"self_attn.qkv_proj.weight": [torch.cat(x) for x in zip(q, k, v, strict=True)]}
        shards = _q_shards(layout, w, 0) if which == "q" else _kv_shards(layout, w)
        name = f"self_attn.qkv_proj.weight_{which}" if layout.qkv_linear else rest
        return {name: shards}
    raise ValueError(f"unexpected Llama parameter model.layers.N.{rest}")


def shard_full_state(
    full: dict[str, torch.Tensor], layout: NxdLayout
) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """HF state dict -> ``{(tp_rank, pp_rank): NxD state dict}`` (what the converter writes
    into ``model/dp_rank_00_tp_rank_XX_pp_rank_YY.pt``)."""
    tp, pp = layout.tp, layout.pp
    full = untie_lm_head(full)
    out: dict[tuple[int, int], dict[str, torch.Tensor]] = {
        (t, p): {} for t in range(tp) for p in range(pp)
    }
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, w in full.items():
        m = LAYER_RE.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = w
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        elif name == "model.embed_tokens.weight":
            for t, s in enumerate(_chunk(w, tp, 0)):
                out[(t, 0)][name] = s
        elif name == "lm_head.weight":
            for t, s in enumerate(_chunk(w, tp, 0)):
                out[(t, pp - 1)][name] = s
        elif name == "model.norm.weight":
            for t in range(tp):
                out[(t, pp - 1)][name] = w.clone()
        else:
            raise ValueError(f"unexpected parameter {name!r} in the HF state dict")
    for i, params in sorted(layers.items()):
        stage = layout.stage_of_layer(i)
        for rest, w in params.items():
            for nxd_rest, shards in _shard_layer_param(layout, rest, w, params).items():
                for t, s in enumerate(shards):
                    out[(t, stage)][f"model.layers.{i}.{nxd_rest}"] = s
    return out


def merge_shards(
    shards: dict[tuple[int, int], dict[str, torch.Tensor]], layout: NxdLayout
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`shard_full_state`: per-rank NxD state dicts -> full HF state dict."""
    import torch

    tp = layout.tp
    by_name: dict[str, list[torch.Tensor]] = {}
    for t in range(tp):
        for p in range(layout.pp):
            for name, w in shards[(t, p)].items():
                by_name.setdefault(name, [None] * tp)[t] = w  # type: ignore[list-item]
    full: dict[str, torch.Tensor] = {}
    for name, parts in by_name.items():
        if any(x is None for x in parts):
            raise ValueError(f"{name}: missing on some TP ranks")
        m = LAYER_RE.match(name)
        rest = m.group(2) if m else name
        prefix = name[: len(name) - len(rest)]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            full[name] = torch.cat(parts, 0)
        elif rest.endswith("layernorm.weight") or name == "model.norm.weight":
            full[name] = parts[0].clone()
        elif rest == "self_attn.o_proj.weight":
            full[name] = _q_merge(layout, parts, 1)
        elif rest == "mlp.down_proj.weight":
            full[name] = torch.cat(parts, 1)
        elif rest == "mlp.gate_up_proj.weight":
            halves = [x.chunk(2, 0) for x in parts]
            full[prefix + "mlp.gate_proj.weight"] = torch.cat([h[0] for h in halves])
            full[prefix + "mlp.up_proj.weight"] = torch.cat([h[1] for h in halves])
        elif rest == "self_attn.qkv_proj.weight":
            q_rows = layout.heads_per_rank * layout.shape.head_dim
            kv_rows = (parts[0].shape[0] - q_rows) // 2
            split = [torch.split(x, [q_rows, kv_rows, kv_rows]) for x in parts]
            for j, which in enumerate("qkv"):
                full[f"{prefix}self_attn.{which}_proj.weight"] = torch.cat([s[j] for s in split])
        elif rest.startswith("self_attn.qkv_proj.weight_"):
            which = rest[-1]
            merged = _q_merge(layout, parts, 0) if which == "q" else _kv_merge(layout, parts)
            full[f"{prefix}self_attn.{which}_proj.weight"] = merged
        elif rest in ("self_attn.q_proj.weight",):
            full[name] = _q_merge(layout, parts, 0)
        elif rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            full[name] = _kv_merge(layout, parts)
        else:
            raise ValueError(f"unexpected NxD parameter {name!r}")
    return full


def untie_lm_head(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF omits ``lm_head.weight`` when embeddings are tied; NxD wants it explicit."""
    if "lm_head.weight" in full or "model.embed_tokens.weight" not in full:
        return full
    return {**full, "lm_head.weight": full["model.embed_tokens.weight"].clone()}
