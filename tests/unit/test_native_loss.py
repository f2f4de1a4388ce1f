"""The chunked fused LM head + cross entropy against the plain head on random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpt_training.native import llama
from cpt_training.native.loss import IGNORE_INDEX, chunked_linear_cross_entropy

pytestmark = pytest.mark.unit


def reference(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    logits = h @ w.t()
    return F.cross_entropy(
        logits.flatten(0, -2).float(), t.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 1000])
def test_loss_and_gradients_equal_the_plain_head_in_fp32(chunk: int) -> None:
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(3, 21, 16, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.randn(50, 16, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    t = torch.randint(0, 50, (3, 21), generator=g)
    t[0, :5] = IGNORE_INDEX
    t[2, -1] = IGNORE_INDEX
    ref = reference(h, w, t)
    (ref * 0.37).backward()
    gh, gw = h.grad, w.grad
    h.grad = w.grad = None
    out = chunked_linear_cross_entropy(h, w, t, chunk=chunk)
    (out * 0.37).backward()
    assert float(out.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert h.grad is not None and w.grad is not None and gh is not None and gw is not None
    assert rel(h.grad, gh) < 1e-6
    assert rel(w.grad, gw) < 1e-6


def test_bf16_inputs_stay_within_bf16_rounding_of_the_plain_head() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(300, 32, generator=g) * 0.2).bfloat16().requires_grad_()
    t = torch.randint(0, 300, (64,), generator=g)
    ref = reference(h, w, t)
    ref.backward()
    gh, gw = h.grad, w.grad
    h.grad = w.grad = None
    out = chunked_linear_cross_entropy(h, w, t, chunk=24)
    out.backward()
    assert out.dtype == torch.float32
    assert float(out.detach()) == pytest.approx(float(ref.detach()), rel=1e-3)
    assert h.grad is not None and h.grad.dtype == torch.bfloat16 and gh is not None
    assert w.grad is not None and gw is not None
    assert rel(h.grad, gh) < 2e-2
    assert rel(w.grad, gw) < 2e-2


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients() -> None:
    h = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    t = torch.full((8,), IGNORE_INDEX)
    out = chunked_linear_cross_entropy(h, w, t, chunk=3)
    out.backward()
    assert float(out) == 0.0
    assert h.grad is not None and w.grad is not None
    assert not h.grad.any() and not w.grad.any()


def test_a_frozen_weight_gets_no_gradient_and_the_hidden_states_still_do() -> None:
    h = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(10, 4)
    out = chunked_linear_cross_entropy(h, w, torch.randint(0, 10, (8,)), chunk=5)
    out.backward()
    assert h.grad is not None and w.grad is None


def test_bad_shapes_and_chunks_are_rejected_with_the_numbers() -> None:
    with pytest.raises(ValueError, match="5 hidden rows but 4 targets"):
        chunked_linear_cross_entropy(torch.randn(5, 4), torch.randn(10, 4), torch.zeros(4).long())
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_linear_cross_entropy(
            torch.randn(5, 4), torch.randn(10, 4), torch.zeros(5).long(), chunk=0
        )


def test_the_ignore_index_is_the_model_s() -> None:
    assert IGNORE_INDEX == llama.IGNORE_INDEX


def test_the_model_s_fused_head_gives_the_plain_head_s_loss_and_gradients() -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    plain = llama.Llama.from_hf_config(cfg)
    fused = llama.Llama.from_hf_config(cfg)
    fused.load_state_dict(plain.state_dict())
    fused.use_fused_loss(compiled=False)
    ids = torch.randint(0, 97, (2, 24))
    targets = llama.shift_targets(ids)
    a, b = plain(ids, targets), fused(ids, targets)
    a.backward()
    b.backward()
    assert float(b.detach()) == pytest.approx(float(a.detach()), rel=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        assert rel(q.grad, p.grad) < 1e-4, name
