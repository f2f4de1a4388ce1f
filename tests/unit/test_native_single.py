"""The one-device path's master weights: bf16 compute copies, fp32 gradient sums, ties kept."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from cpt_training.native.llama import Llama, shift_targets
from cpt_training.native.single import MasterWeights

pytestmark = pytest.mark.unit


def tiny(tied: bool = True) -> Llama:
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = Llama.from_hf_config(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def test_forward_runs_on_bf16_copies_and_leaves_the_fp32_weights_alone() -> None:
    model = tiny()
    mw = MasterWeights(model)
    mw.refresh()
    assert all(c.dtype == torch.bfloat16 for c in mw.compute)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.randint(0, 64, (2, 12))
    fp32 = model(ids, shift_targets(ids))
    bf16 = mw(ids, shift_targets(ids))
    # bf16 weights and activations: close to the fp32 loss, not equal to it.
    assert float(bf16.detach()) == pytest.approx(float(fp32.detach()), rel=2e-2)
    assert float(bf16.detach()) != float(fp32.detach())
    # The same as a model whose own weights are bf16.
    model_bf16 = tiny().to(torch.bfloat16)
    same = model_bf16(ids, shift_targets(ids)).detach()
    assert float(same) == pytest.approx(float(bf16.detach()), rel=1e-6)


def test_gradients_of_micro_batches_are_summed_in_fp32_into_the_master_weights() -> None:
    model = tiny()
    mw = MasterWeights(model)
    mw.refresh()
    batches = [torch.randint(0, 64, (2, 12)) for _ in range(3)]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ids in batches:
        mw(ids, shift_targets(ids)).backward()
        for n, c in zip(mw.names, mw.compute, strict=True):
            assert c.grad is not None
            expected[n] += c.grad.float()
        mw.accumulate()
        assert all(c.grad is None for c in mw.compute)
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, n
        torch.testing.assert_close(p.grad, expected[n], rtol=0, atol=0)


def test_tied_embeddings_stay_one_tensor_and_get_both_gradients() -> None:
    model = tiny(tied=True)
    mw = MasterWeights(model)
    assert "lm_head.weight" not in mw.names  # the tied matrix is one parameter
    mw.refresh()
    ids = torch.randint(0, 64, (2, 12))
    mw(ids, shift_targets(ids)).backward()
    mw.accumulate()
    ref = tiny(tied=True).to(torch.bfloat16)
    ref(ids, shift_targets(ids)).backward()
    emb = model.model.embed_tokens.weight.grad
    assert emb is not None and ref.model.embed_tokens.weight.grad is not None
    # embedding lookup + LM head, both into the one matrix
    torch.testing.assert_close(emb, ref.model.embed_tokens.weight.grad.float(), rtol=0, atol=0)


def test_refresh_after_an_optimizer_step_moves_the_copies_to_the_new_weights() -> None:
    model = tiny()
    mw = MasterWeights(model)
    mw.refresh()
    first = [c for c in mw.compute]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ids = torch.randint(0, 64, (2, 12))
    mw(ids, shift_targets(ids)).backward()
    mw.accumulate()
    opt.step()
    mw.refresh()
    assert all(a is b for a, b in zip(first, mw.compute, strict=True))  # reused buffers
    for p, c in zip(mw.masters, mw.compute, strict=True):
        torch.testing.assert_close(c, p.detach().to(torch.bfloat16), rtol=0, atol=0)


def test_a_forward_before_the_first_refresh_is_an_error() -> None:
    mw = MasterWeights(tiny())
    with pytest.raises(RuntimeError, match="refresh"):
        mw(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
