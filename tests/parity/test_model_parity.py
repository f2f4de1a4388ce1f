"""The native Llama is transformers' LlamaForCausalLM, exactly: for every model variant the
native backend accepts (every rope type transformers has for Llama, MHA/GQA/MQA, tied and
untied embeddings, an explicit head_dim, biases, eps), HF weights loaded into the native model
and native weights exported into HF give bit-identical fp32 logits at sequence lengths below,
at and above every rope threshold; bf16 stays within HF's own bf16 error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from cpt_training.export import build_hf_model
from cpt_training.native.llama import Llama, shift_targets
from fixtures.parity_models import (
    LENGTHS,
    MAX_POS,
    ROPES,
    VOCAB,
    llama_config,
    randomise,
)

pytestmark = pytest.mark.parity

SHAPES: dict[str, dict[str, Any]] = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "mqa": {"num_key_value_heads": 1},
    "tied": {"tie_word_embeddings": True},
    "head-dim": {"head_dim": 16},
    "biases": {"attention_bias": True, "mlp_bias": True},
    "eps": {"rms_norm_eps": 1e-3},
}


def _ids(length: int, batch: int = 2) -> Any:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


VARIANTS = sorted(
    {(rope, shape) for rope in ROPES for shape in ("gqa", "head-dim")}
    | {(rope, shape) for rope in ("default", "dynamic", "longrope") for shape in SHAPES}
)
"""Every rope type with the default shape and an explicit head_dim (the rotary width), every
shape option with the rope types whose tables change with the length. Shape options act
outside the rotary embedding, so the full cross product adds run time and no case."""


def test_every_rope_type_transformers_has_for_llama_is_covered() -> None:
    """A new rope type in a transformers update fails here until the suite covers it."""
    assert set(ROPES) == {"default", *ROPE_INIT_FUNCTIONS}


@pytest.mark.parametrize(("rope", "shape"), VARIANTS)
def test_hf_weights_in_the_native_model_give_identical_fp32_logits(rope: str, shape: str) -> None:
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(llama_config(rope, **SHAPES[shape])).eval()
    randomise(hf, 1)
    ours = Llama.from_hf_config(hf.config)
    ours.load_state_dict(hf.state_dict(), strict=True)
    ours.eval()
    with torch.no_grad():
        for length in LENGTHS:
            ids = _ids(length)
            expected = hf(input_ids=ids).logits
            got = ours.logits(ids)
            assert torch.equal(got, expected), (length, (got - expected).abs().max().item())


@pytest.mark.parametrize(("rope", "shape"), VARIANTS)
def test_native_weights_exported_to_hf_give_identical_fp32_logits(
    rope: str, shape: str, tmp_path: Path
) -> None:
    """Through the exporter's own steps: strict load into LlamaForCausalLM, save_pretrained,
    and what a user runs, from_pretrained (config.json included)."""
    config = llama_config(rope, **SHAPES[shape])
    ours = Llama.from_hf_config(config)
    randomise(ours, 2)
    ours.eval()
    state = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    if ours.args.tie_word_embeddings:
        state.pop("lm_head.weight")  # as the exporter reads a native checkpoint
    build_hf_model(config, state, torch.float32).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        for length in LENGTHS:
            ids = _ids(length)
            expected = ours.logits(ids)
            got = hf(input_ids=ids).logits
            assert torch.equal(got, expected), (length, (got - expected).abs().max().item())


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_gradients_equal_the_hf_models_past_every_rope_threshold(rope: str) -> None:
    """What a training step changes is what HF would change: same loss, same gradients, at a
    length past every threshold (the case where dynamic rope used to train another model)."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(llama_config(rope)).train()
    randomise(hf, 3)
    ours = Llama.from_hf_config(hf.config)
    ours.load_state_dict(hf.state_dict(), strict=True)
    ours.train()
    ids = _ids(3 * MAX_POS)
    ref = hf(input_ids=ids, labels=ids).loss
    ref.backward()
    loss = ours(ids, shift_targets(ids)) / (ids.shape[0] * (ids.shape[1] - 1))
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def _errors(logits: Any, reference: Any) -> tuple[float, float]:
    """(RMS, max) absolute error of bf16 logits against the fp32 reference."""
    diff = logits.float() - reference
    return float(diff.pow(2).mean().sqrt()), float(diff.abs().max())


@pytest.mark.parametrize("rope", ["default", "dynamic", "longrope", "yarn"])
def test_bf16_logits_stay_within_hf_own_bf16_error(rope: str) -> None:
    """In bf16 the two models may round differently (fused kernels); the native model's error
    against the fp32 reference must stay within HF's own bf16 error on the same input: its RMS
    within 1.25x, its largest single error within 1.5x. The RMS is the check: the maximum over
    a few hundred logits depends on which CPU's bf16 kernels ran (on an AMD EPYC host the
    largest error at length 8 with longrope was 1.26x HF's at an RMS of 1.02x; 1.07x is the
    worst RMS ratio over these cases there)."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(llama_config(rope)).eval()
    randomise(hf, 4)
    with torch.no_grad():
        reference = {n: hf(input_ids=_ids(n)).logits for n in LENGTHS}
        hf16 = hf.to(torch.bfloat16)
        ours = Llama.from_hf_config(hf16.config).to(torch.bfloat16)
        ours.load_state_dict(hf16.state_dict(), strict=True)
        ours.eval()
        for n in LENGTHS:
            hf_rms, hf_max = _errors(hf16(input_ids=_ids(n)).logits, reference[n])
            our_rms, our_max = _errors(ours.logits(_ids(n)), reference[n])
            assert our_rms <= 1.25 * hf_rms + 1e-6, (n, our_rms, hf_rms)
            assert our_max <= 1.5 * hf_max + 1e-6, (n, our_max, hf_max)
