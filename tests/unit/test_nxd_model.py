"""The nxd Llama, run on CPU with the plain-torch layer kit (TP=1).

We test these aspects:
- Loaded from the converter-layout shards (strict: the names must match exactly), it computes
  HF ``LlamaForCausalLM``'s loss and logits, for each q/k/v layout (split GQA, fused MHA,
  qkv_linear), with tied embeddings, with llama3 rope scaling, and in the sequence-parallel
  (seq-first) activation layout NxD's layers use.
- It is torch.fx traceable with the leaf modules we declare to NxD's pipeline tracer.
- Activation-checkpointing choices and the meta-init ``param_init_fn``.

What this cannot show: NxD's parallel layers and collectives (no Trainium here). Their
contract (local shapes, seq-first layout under SP) is what the torch kit reproduces.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_training.nxd import model as nm
from cpt_training.nxd.layout import LlamaShape, plan_layout, shard_full_state

pytestmark = pytest.mark.unit


def make(heads=4, kv=2, tie=False, rope=None, layers=2, seed=0):
    torch.manual_seed(seed)
    kwargs = {"rope_scaling": rope, "rope_theta": 500000.0} if rope else {}
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        **kwargs,
    )
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return cfg, hf


def ours_from(cfg, hf, *, qkv_linear=False, sp=False):
    shape = LlamaShape.from_config(cfg.to_dict())
    layout = plan_layout(shape, tp=1, pp=1, qkv_linear=qkv_linear)
    spec = nm.ModelSpec(layout, sequence_parallel=sp)
    model = nm.build_model(spec, nm.TorchKit(sequence_parallel=sp)).eval()
    sd = dict(hf.state_dict())
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    shard = shard_full_state(sd, layout)[(0, 0)]
    model.load_state_dict(shard, strict=True)
    return model


CASES = [
    pytest.param({"heads": 4, "kv": 2}, {}, id="gqa-split"),
    pytest.param({"heads": 4, "kv": 4}, {}, id="mha-fused"),
    pytest.param({"heads": 4, "kv": 1}, {"qkv_linear": True}, id="qkv-linear"),
    pytest.param({"heads": 4, "kv": 2, "tie": True}, {}, id="tied-embeddings"),
    pytest.param({"heads": 4, "kv": 2}, {"sp": True}, id="sequence-parallel-layout"),
    pytest.param(
        {
            "heads": 4,
            "kv": 2,
            "rope": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
        {},
        id="llama3-rope",
    ),
]


@pytest.mark.parametrize(("mk", "kw"), CASES)
def test_loss_and_logits_equal_hf_llama(mk, kw):
    cfg, hf = make(**mk)
    ours = ours_from(cfg, hf, **kw)
    torch.manual_seed(3)
    ids = torch.randint(0, 96, (2, 24))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels)
        loss = ours(ids, labels)
        logits = ours.logits(ids)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_every_parameter():
    cfg, hf = make()
    ours = ours_from(cfg, hf).train()
    ids = torch.randint(0, 96, (2, 8))
    ours(ids, ids).backward()
    missing = [n for n, p in ours.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_the_upcast_dtype_follows_xla_downcast_bf16():
    cfg, _ = make()
    layout = plan_layout(LlamaShape.from_config(cfg.to_dict()), tp=1, pp=1)
    assert nm.model_spec(layout, sequence_parallel=False, env={}).upcast is torch.float32
    spec = nm.model_spec(layout, sequence_parallel=True, env={"XLA_DOWNCAST_BF16": "1"})
    assert spec.upcast is torch.float64
    assert spec.sequence_parallel is False  # SP only means something with TP > 1


class _NxdLikeTracer(torch.fx.Tracer):
    """Leaf rule of NxD's pipeline tracer: class-name substring match."""

    def is_leaf_module(self, m, qualname):
        if any(t in type(m).__name__ for t in nm.LEAF_MODULE_NAMES):
            return True
        return super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("kw", [{}, {"qkv_linear": True}, {"sp": True}], ids=str)
def test_the_model_traces_with_torch_fx_and_the_trace_computes_the_same_loss(kw):
    cfg, hf = make(kv=1 if kw.get("qkv_linear") else 2)
    ours = ours_from(cfg, hf, **kw)
    graph = _NxdLikeTracer().trace(ours)
    traced = torch.fx.GraphModule(ours, graph)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(traced(ids, ids), ours(ids, ids))
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    # the dtype/device-heavy pieces stay opaque to the tracer, as NxD needs
    assert "model.layers.1.self_attn.core_attn" in called
    assert "model.layers.0.self_attn.rotary" in called
    assert "loss_head" in called


def test_activation_checkpointing_choices():
    assert nm.activation_checkpoint_classes("none", 4096) is None
    assert nm.activation_checkpoint_classes("full", 4096) == (nm.CptDecoderLayer,)
    assert nm.activation_checkpoint_classes("selective", 4096) == (nm.CptCoreAttention,)
    assert nm.activation_checkpoint_classes("selective", 8192) == (
        nm.CptCoreAttention,
        nm.CptMLP,
    )
    with pytest.raises(ValueError, match="allowed: none, full, selective"):
        nm.activation_checkpoint_classes("some", 4096)


def test_param_init_fn_gives_finite_values_after_meta_init():
    cfg, _ = make()
    layout = plan_layout(LlamaShape.from_config(cfg.to_dict()), tp=1, pp=1)
    with torch.device("meta"):
        model = nm.build_model(nm.ModelSpec(layout), nm.TorchKit())
    model.to_empty(device="cpu")
    for m in model.modules():
        nm.init_weights(m, torch.device("cpu"))
        if isinstance(m, torch.nn.Linear | torch.nn.Embedding):
            m.reset_parameters()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    assert torch.equal(model.model.norm.weight, torch.ones(32))


def test_rope_inverse_frequencies_match_hf_for_llama3_scaling():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg, _ = make(rope=rope)
    shape = LlamaShape.from_config(cfg.to_dict())
    ours = nm.rope_inv_freq(shape.rope, shape.head_dim)
    theirs = LlamaRotaryEmbedding(cfg).inv_freq.double()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
