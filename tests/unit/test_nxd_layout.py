"""The NxD shard layout of a Llama, checked numerically on tiny models.

We test these aspects:
- HF -> per-rank shards -> HF is exact for every layout cpt uses (GQA split, MHA coalesced,
  qkv_linear with KV replication, PP stages, tied embeddings).
- The layout is *semantically* right, not just invertible: an attention layer computed rank by
  rank from the shards (each rank's query heads against its own KV heads, o_proj partial sums
  added) equals HF's full attention. A wrong query-head regrouping would still round-trip but
  fails this.
- Shard keys are exactly the names the trainer's model declares (``nxd_param_names``).
- Bad TP/KV/PP combinations are refused with the knob named.

The reference mirrors NxD's converter (trn1 branch) as read at the 2.28/2.29 releases; the real
converter runs in production and on hardware, this is the specification our model is held to.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_training.nxd.layout import (
    LlamaShape,
    hf_param_names,
    merge_shards,
    nxd_param_names,
    plan_layout,
    shard_file_name,
    shard_full_state,
    stage_bounds,
)

pytestmark = pytest.mark.unit


def tiny_hf(heads: int = 8, kv: int = 2, layers: int = 3, tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32 if heads <= 8 else 64,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a dropped/misplaced norm shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return cfg, model


def hf_state(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # as save_pretrained writes it
    return sd


LAYOUTS = [
    # heads, kv, tp, pp, kvm, qkv_linear
    pytest.param(8, 2, 2, 1, 1, False, id="gqa-tp2"),
    pytest.param(8, 2, 1, 3, 1, False, id="gqa-pp3"),
    pytest.param(8, 2, 2, 2, 1, False, id="gqa-tp2-pp2-uneven"),
    pytest.param(8, 2, 2, 1, 1, True, id="qkv-linear-tp2"),
    pytest.param(8, 2, 4, 1, 2, True, id="qkv-linear-kv-replicated-x2"),
    pytest.param(8, 2, 8, 2, 4, True, id="qkv-linear-kv-replicated-x4-pp2"),
    pytest.param(4, 4, 2, 1, 1, False, id="mha-coalesced-tp2"),
    pytest.param(4, 4, 4, 1, 1, True, id="mha-qkv-linear-tp4"),
]


@pytest.mark.parametrize(("heads", "kv", "tp", "pp", "kvm", "qkv"), LAYOUTS)
def test_hf_to_shards_to_hf_is_exact_and_keys_match_the_model(heads, kv, tp, pp, kvm, qkv):
    cfg, model = tiny_hf(heads, kv)
    shape = LlamaShape.from_config(cfg.to_dict())
    layout = plan_layout(shape, tp=tp, pp=pp, kv_size_multiplier=kvm, qkv_linear=qkv)
    full = hf_state(model)
    shards = shard_full_state(full, layout)
    assert set(shards) == {(t, p) for t in range(tp) for p in range(pp)}
    for (_t, p), sd in shards.items():
        assert sorted(sd) == sorted(nxd_param_names(layout, p))
    merged = merge_shards(shards, layout)
    assert sorted(merged) == sorted(hf_param_names(shape))
    for k, v in full.items():
        assert torch.equal(merged[k], v), k


def test_shards_have_the_local_shapes_of_the_parallel_layers():
    cfg, model = tiny_hf(8, 2)
    shape = LlamaShape.from_config(cfg.to_dict())
    layout = plan_layout(shape, tp=8, pp=1, kv_size_multiplier=4, qkv_linear=True)
    sd = shard_full_state(hf_state(model), layout)[(3, 0)]
    hd = shape.head_dim
    assert sd["model.layers.0.self_attn.qkv_proj.weight_q"].shape == (1 * hd, 32)
    assert sd["model.layers.0.self_attn.qkv_proj.weight_k"].shape == (1 * hd, 32)  # 2*4/8 heads
    assert sd["model.layers.0.self_attn.o_proj.weight"].shape == (32, hd)
    assert sd["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 48 // 8, 32)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (32, 48 // 8)
    assert sd["model.embed_tokens.weight"].shape == (64 // 8, 32)


def _rank_attention(sd, layer, x, heads_local, kv_local, hd, mode):
    """One TP rank's attention from its shard: local q heads against local KV heads, output
    projected with the rank's o_proj columns (a partial sum, as RowParallelLinear computes)."""
    p = f"model.layers.{layer}.self_attn."
    if mode == "qkv_linear":
        wq, wk, wv = (sd[p + f"qkv_proj.weight_{c}"] for c in "qkv")
    elif mode == "fused":
        wq, wk, wv = sd[p + "qkv_proj.weight"].split(heads_local * hd)
    else:
        wq, wk, wv = (sd[p + f"{c}_proj.weight"] for c in "qkv")
    b, s, _ = x.shape
    q = (x @ wq.T).view(b, s, heads_local, hd).transpose(1, 2)
    k = (x @ wk.T).view(b, s, kv_local, hd).transpose(1, 2)
    v = (x @ wv.T).view(b, s, kv_local, hd).transpose(1, 2)
    g = heads_local // kv_local
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = out.transpose(1, 2).reshape(b, s, heads_local * hd)
    return out @ sd[p + "o_proj.weight"].T


@pytest.mark.parametrize(
    ("heads", "kv", "tp", "kvm", "qkv"),
    [
        pytest.param(8, 2, 2, 1, False, id="gqa-split"),
        pytest.param(8, 2, 4, 2, True, id="qkv-linear-x2"),
        pytest.param(8, 2, 8, 4, True, id="qkv-linear-x4"),
        pytest.param(4, 4, 2, 1, False, id="mha-coalesced"),
    ],
)
def test_rank_by_rank_attention_from_the_shards_equals_hf_attention(heads, kv, tp, kvm, qkv):
    cfg, model = tiny_hf(heads, kv, layers=1)
    shape = LlamaShape.from_config(cfg.to_dict())
    layout = plan_layout(shape, tp=tp, pp=1, kv_size_multiplier=kvm, qkv_linear=qkv)
    shards = shard_full_state(hf_state(model), layout)
    mode = "qkv_linear" if qkv else "fused" if layout.coalesce_qkv else "split"
    torch.manual_seed(1)
    x = torch.randn(2, 5, shape.hidden)
    # HF reference without rotary (identity positions) to isolate the head bookkeeping
    attn = model.model.layers[0].self_attn
    hd = shape.head_dim
    q = attn.q_proj(x).view(2, 5, heads, hd).transpose(1, 2)
    k = attn.k_proj(x).view(2, 5, kv, hd).transpose(1, 2).repeat_interleave(heads // kv, 1)
    v = attn.v_proj(x).view(2, 5, kv, hd).transpose(1, 2).repeat_interleave(heads // kv, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = attn.o_proj(ref.transpose(1, 2).reshape(2, 5, heads * hd))
    total = sum(
        _rank_attention(
            shards[(r, 0)], 0, x, layout.heads_per_rank, layout.kv_heads_per_rank, hd, mode
        )
        for r in range(tp)
    )
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)


def test_a_wrong_query_regrouping_would_break_the_attention_check():
    """Guard for the test above: with the plain (unregrouped) split the check must fail."""
    cfg, model = tiny_hf(8, 2, layers=1)
    shape = LlamaShape.from_config(cfg.to_dict())
    good = plan_layout(shape, tp=4, pp=1, kv_size_multiplier=2, qkv_linear=True)
    shards = shard_full_state(hf_state(model), good)
    wq = model.model.layers[0].self_attn.q_proj.weight.detach()
    wo = model.model.layers[0].self_attn.o_proj.weight.detach()
    plain_q, plain_o = wq.chunk(4, 0), wo.chunk(4, 1)
    differs = [
        not torch.equal(shards[(r, 0)]["model.layers.0.self_attn.qkv_proj.weight_q"], plain_q[r])
        for r in range(4)
    ]
    assert any(differs)
    for r in range(4):
        shards[(r, 0)]["model.layers.0.self_attn.qkv_proj.weight_q"] = plain_q[r]
        shards[(r, 0)]["model.layers.0.self_attn.o_proj.weight"] = plain_o[r]
    torch.manual_seed(1)
    x = torch.randn(1, 4, shape.hidden)
    attn = model.model.layers[0].self_attn
    hd = shape.head_dim
    q = attn.q_proj(x).view(1, 4, 8, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, 4, 2, hd).transpose(1, 2).repeat_interleave(4, 1)
    v = attn.v_proj(x).view(1, 4, 2, hd).transpose(1, 2).repeat_interleave(4, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = attn.o_proj(ref.transpose(1, 2).reshape(1, 4, 8 * hd))
    total = sum(_rank_attention(shards[(r, 0)], 0, x, 2, 1, hd, "qkv_linear") for r in range(4))
    assert not torch.allclose(total, ref, atol=1e-4)


def test_tied_embeddings_get_an_explicit_lm_head_on_the_way_in():
    cfg, model = tiny_hf(8, 2, tie=True)
    shape = LlamaShape.from_config(cfg.to_dict())
    layout = plan_layout(shape, tp=2, pp=1)
    full = hf_state(model)
    assert "lm_head.weight" not in full
    merged = merge_shards(shard_full_state(full, layout), layout)
    assert torch.equal(merged["lm_head.weight"], full["model.embed_tokens.weight"])


def test_pipeline_stages_split_evenly_with_the_remainder_on_later_stages():
    assert stage_bounds(10, 4) == [0, 2, 4, 7, 10]
    assert stage_bounds(80, 8) == [0, 10, 20, 30, 40, 50, 60, 70, 80]
    assert stage_bounds(3, 3) == [0, 1, 2, 3]


def test_embeddings_live_on_the_first_stage_and_the_head_on_the_last():
    cfg, _ = tiny_hf(8, 2, layers=4)
    layout = plan_layout(LlamaShape.from_config(cfg.to_dict()), tp=1, pp=2)
    first, last = nxd_param_names(layout, 0), nxd_param_names(layout, 1)
    assert "model.embed_tokens.weight" in first and "lm_head.weight" not in first
    assert "lm_head.weight" in last and "model.norm.weight" in last
    assert any(n.startswith("model.layers.1.") for n in first)
    assert not any(n.startswith("model.layers.2.") for n in first)


def test_shard_file_names_follow_nxd():
    assert shard_file_name(3, 12) == "dp_rank_00_tp_rank_03_pp_rank_12.pt"


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"tp": 3}, "tensorParallel=3 must divide num_attention_heads"),
        ({"tp": 4}, "must divide num_key_value_heads=2 without qkvLinear"),
        ({"tp": 4, "qkv_linear": True}, "kvSizeMultiplier=2"),
        ({"tp": 2, "kv_size_multiplier": 2}, "needs qkvLinear=true"),
        ({"tp": 1, "pp": 5}, "exceeds num_hidden_layers=3"),
        ({"tp": 1, "qkv_linear": True}, "qkvLinear=false"),
    ],
)
def test_impossible_layouts_are_refused_with_the_knob_named(kw, needle):
    cfg, _ = tiny_hf(8, 2)
    shape = LlamaShape.from_config(cfg.to_dict())
    args = {"tp": 1, "pp": 1, **kw}
    with pytest.raises(ValueError, match=needle):
        plan_layout(shape, **args)


def test_tied_embeddings_with_pipeline_parallelism_are_refused():
    cfg, _ = tiny_hf(8, 2, tie=True)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        plan_layout(LlamaShape.from_config(cfg.to_dict()), tp=1, pp=2)


def test_config_reader_handles_both_transformers_rope_spellings_and_rejects_unknown_kinds():
    base = {
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "vocab_size": 128,
    }
    v4 = {
        **base,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    v5 = {**base, "rope_parameters": {**v4["rope_scaling"], "rope_theta": 500000.0}}
    assert LlamaShape.from_config(v4).rope == LlamaShape.from_config(v5).rope
    assert LlamaShape.from_config(v4).rope.kind == "llama3"
    assert LlamaShape.from_config(base).kv_heads == 4
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        LlamaShape.from_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="attention_bias"):
        LlamaShape.from_config({**base, "attention_bias": True})
