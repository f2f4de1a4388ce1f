"""The lean Llama equals transformers' LlamaForCausalLM: same names, same logits, same loss."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cpt_training.native.llama import (  # noqa: E402
    IGNORE_INDEX,
    Llama,
    LlamaArgs,
    shift_targets,
)

pytestmark = pytest.mark.unit


def _hf(**overrides: object) -> object:
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **overrides,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ours(hf: object) -> Llama:
    m = Llama.from_hf_config(hf.config)  # type: ignore[attr-defined]
    m.load_state_dict(hf.state_dict(), strict=True)  # type: ignore[attr-defined]
    return m.eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True},
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ],
    ids=["plain", "tied", "biases", "llama3-rope"],
)
def test_logits_and_loss_equal_the_hugging_face_model(overrides: dict[str, object]) -> None:
    hf = _hf(**overrides)
    ours = _ours(hf)
    assert set(ours.state_dict()) == set(hf.state_dict())  # type: ignore[attr-defined]
    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids)  # type: ignore[operator]
        logits = ours.logits(ids)
        loss = ours(ids, shift_targets(ids)) / (3 * 39)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref.loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(ac: str) -> None:
    hf = _hf()
    plain, ckpt = _ours(hf), _ours(hf)
    ckpt.set_activation_checkpointing(ac)  # type: ignore[arg-type]
    plain.train()
    ckpt.train()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    for m in (plain, ckpt):
        m(ids, shift_targets(ids)).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_shift_targets_predicts_the_next_token_and_ignores_the_last_position() -> None:
    labels = torch.tensor([[5, 6, 7, 8]])
    assert shift_targets(labels).tolist() == [[6, 7, 8, IGNORE_INDEX]]


def test_param_count_matches_the_module() -> None:
    for tied in (False, True):
        hf = _hf(tie_word_embeddings=tied)
        args = LlamaArgs.from_hf(hf.config)  # type: ignore[attr-defined]
        n = sum(p.numel() for p in _ours(hf).parameters())  # shared tensors counted once
        assert args.num_params() == n


def test_non_llama_configs_are_rejected_with_the_allowed_value() -> None:
    cfg = transformers.MistralConfig(vocab_size=10, hidden_size=8, num_attention_heads=2)
    with pytest.raises(ValueError, match="'llama'"):
        LlamaArgs.from_hf(cfg)
