"""Float8 training's guards, module selection and conversion (native/float8.py). Training in
float8 needs a GPU of compute capability 8.9+: it is measured on an H100 by the bench
(bench/results/train-float8-h100.json), not here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cpt_training.native.float8 import convertible, float8_problem
from cpt_training.native.llama import Llama

pytestmark = pytest.mark.unit


def _tiny() -> Llama:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.device("meta"):
        return Llama.from_hf_config(cfg)


def test_only_the_blocks_projections_are_converted_and_the_head_stays_bf16() -> None:
    model = _tiny()
    picked = [n for n, m in model.named_modules() if convertible(m, n)]
    assert len(picked) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks
    assert all(".layers." in f".{n}" for n in picked)
    assert "lm_head" not in picked


def test_a_matrix_whose_sides_are_not_multiples_of_16_stays_bf16() -> None:
    with torch.device("meta"):
        odd = nn.Linear(64, 40)
        even = nn.Linear(64, 48)
    assert not convertible(odd, "model.layers.0.mlp.up_proj")
    assert convertible(even, "model.layers.0.mlp.up_proj")


def test_float8_on_a_cpu_run_is_refused_with_the_field_and_the_fix() -> None:
    problem = float8_problem("cpu")
    assert problem is not None
    assert problem.startswith("training.float8:") and "set float8: false" in problem


def test_torchao_swaps_exactly_the_convertible_projections_for_float8_linears() -> None:
    """The conversion with the locked torchao (the 'float8' extra, installed in the CUDA
    image): it runs on the meta device, so it is checked here; its matmuls need the GPU."""
    from torchao.float8.float8_linear import Float8Linear  # type: ignore[import-untyped]

    from cpt_training.native.float8 import convert_to_float8

    model = _tiny()
    assert convert_to_float8(model) == 2 * 7
    swapped = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    assert len(swapped) == 14 and all(".layers." in f".{n}" for n in swapped)
    assert not isinstance(model.lm_head, Float8Linear)
