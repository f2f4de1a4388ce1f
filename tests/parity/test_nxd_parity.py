"""The nxd path against transformers, where it runs on CPU: its Llama (the layer maths NxD's
parallel layers reduce to at TP=1, built with the plain-torch layer kit) computes HF's logits
and loss for every option the nxd backend accepts, at lengths below and above every rope
threshold; the HF -> NxD shards -> HF weight round trip is bitwise for every layout the
converter writes; and the options it does not implement are refused at planning time.

Tolerance: the nxd model computes the rotary tables in float64 (as NxD's examples do, for
XLA's bf16 downcast) and rounds them to the activations' dtype; HF computes them in fp32.
So fp32 logits agree to rounding (``LOGIT_TOL``), not bit for bit as the native model's do."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from cpt_operator.api.planner import load_run, plan_object
from cpt_training.nxd import model as nm
from cpt_training.nxd.layout import (
    LlamaShape,
    merge_shards,
    plan_layout,
    shard_full_state,
    untie_lm_head,
)
from fixtures.parity_models import LENGTHS, VOCAB, llama_config, randomise

pytestmark = pytest.mark.parity

LOGIT_TOL = 1e-4
"""Largest |HF - nxd| fp32 logit difference allowed (logits of about unit size; measured: up
to 4e-5 at 131 positions with llama3 rope, where the two tables' rounding differs most)."""

NXD_ROPES = ("default", "linear", "llama3")
"""The rope types the nxd model implements (others are refused)."""
LAYOUTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "gqa-split": ({"num_key_value_heads": 2}, {}),
    "mha-fused": ({"num_key_value_heads": 4}, {}),
    "mqa-qkv-linear": ({"num_key_value_heads": 1}, {"qkv_linear": True}),
    "tied": ({"tie_word_embeddings": True}, {}),
    "sequence-parallel-layout": ({}, {"sp": True}),
    "eps": ({"rms_norm_eps": 1e-3}, {}),
}


def _hf(rope: str, **config: Any) -> Any:
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(llama_config(rope, **config)).eval()
    randomise(hf, 1)
    return hf


def _nxd(hf: Any, *, qkv_linear: bool = False, sp: bool = False) -> Any:
    shape = LlamaShape.from_config(hf.config.to_dict())
    layout = plan_layout(shape, tp=1, pp=1, qkv_linear=qkv_linear)
    model = nm.build_model(nm.ModelSpec(layout, sequence_parallel=sp), nm.TorchKit(sp)).eval()
    state = dict(hf.state_dict())
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(shard_full_state(state, layout)[(0, 0)], strict=True)
    return model


VARIANTS = sorted(
    {(rope, "gqa-split") for rope in NXD_ROPES} | {("llama3", layout) for layout in LAYOUTS}
)


@pytest.mark.parametrize(("rope", "layout"), VARIANTS)
def test_the_nxd_model_at_tp1_computes_hf_logits_and_loss(rope: str, layout: str) -> None:
    config, kw = LAYOUTS[layout]
    hf = _hf(rope, **config)
    ours = _nxd(hf, **kw)
    with torch.no_grad():
        for n in LENGTHS:
            ids = torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(n))
            labels = ids.clone()
            labels[0, : n // 3] = -100
            ref = hf(input_ids=ids, labels=labels)
            logits = ours.logits(ids)
            assert (logits - ref.logits).abs().max() <= LOGIT_TOL, n
            torch.testing.assert_close(ours(ids, labels), ref.loss, rtol=1e-5, atol=1e-6)


LAYOUT_DEGREES = [
    pytest.param(4, 2, 1, 1, 1, False, id="gqa-tp1-pp1"),
    pytest.param(8, 2, 2, 2, 1, False, id="gqa-tp2-pp2"),
    pytest.param(8, 8, 4, 3, 1, False, id="mha-fused-tp4-pp3"),
    pytest.param(8, 2, 8, 1, 4, True, id="qkv-linear-kv-x4-tp8"),
    pytest.param(8, 1, 4, 2, 4, True, id="mqa-qkv-linear-tp4-pp2"),
    pytest.param(8, 2, 2, 1, 1, "tied", id="tied-tp2"),
]


@pytest.mark.parametrize(("heads", "kv", "tp", "pp", "kvm", "qkv"), LAYOUT_DEGREES)
def test_hf_to_nxd_shards_to_hf_is_bitwise(
    heads: int, kv: int, tp: int, pp: int, kvm: int, qkv: bool | str
) -> None:
    tied = qkv == "tied"
    hf = _hf(
        "llama3",
        vocab_size=96,  # TP must divide it
        hidden_size=8 * heads,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=3,
        intermediate_size=64,
        tie_word_embeddings=tied,
    )
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    if tied:
        state.pop("lm_head.weight")
    layout = plan_layout(
        LlamaShape.from_config(hf.config.to_dict()),
        tp=tp,
        pp=pp,
        kv_size_multiplier=kvm,
        qkv_linear=qkv is True,
    )
    back = merge_shards(shard_full_state(state, layout), layout)
    expected = untie_lm_head(state)
    assert sorted(back) == sorted(expected)
    for name, w in expected.items():
        assert back[name].dtype == w.dtype and torch.equal(back[name], w), name


REFUSED = [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}}, "dynamic"),
    (
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 2.0,
                "rope_theta": 5e5,
                "original_max_position_embeddings": 8192,
            }
        },
        "yarn",
    ),
    ({"attention_bias": True}, "attention_bias=true is not supported by the nxd backend"),
    ({"head_dim": 64}, "head_dim 64 != hidden_size/num_attention_heads"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED)
def test_the_planner_refuses_what_the_nxd_model_does_not_implement(
    overrides: dict[str, Any], message: str
) -> None:
    doc = copy.deepcopy(load_run(Path(__file__).resolve().parents[2] / "examples" / "run.yaml"))
    doc["spec"]["model"].setdefault("configOverrides", {}).update(overrides)
    p = plan_object(doc)
    assert p.backend == "nxd"
    errors = [str(e) for e in p.errors]
    assert any(e.startswith("spec.model.configOverrides:") and message in e for e in errors), errors
