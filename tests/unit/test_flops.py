"""Model shape, parameter counts, FLOPs per token (torchtitan's definition), MFU, and the
device / instance tables the trainer and the planner share."""

from __future__ import annotations

from typing import Any, get_args

import pytest

from cpt_training.flops import (
    DEVICES,
    INSTANCE_TYPES,
    InstanceTypeName,
    ModelShape,
    instance_type,
    mfu,
    mfu_for_instance,
)

pytestmark = pytest.mark.unit

LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
)
LLAMA2_70B = dict(
    vocab_size=32000,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
)
LLAMA31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
)
LLAMA32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=True,
)


@pytest.mark.parametrize(
    ("config", "params"),
    [
        (LLAMA2_7B, 6_738_415_616),
        (LLAMA2_70B, 68_976_648_192),
        (LLAMA31_8B, 8_030_261_248),
        (LLAMA32_1B, 1_235_814_400),
    ],
)
def test_parameter_counts_match_the_published_model_sizes(
    config: dict[str, Any], params: int
) -> None:
    assert ModelShape.from_hf_config(config).total_params == params


def test_a_layer_counts_gqa_attention_swiglu_mlp_and_two_norms() -> None:
    s = ModelShape.from_hf_config(LLAMA2_70B)
    h, kv = 8192, 8 * 128
    assert s.layer_params == (2 * h * h + 2 * h * kv) + 3 * h * 28672 + 2 * h


@pytest.mark.parametrize(
    ("config", "seq", "gflops"),
    [
        (LLAMA31_8B, 8192, 57.9),  # perf.md: matches NeMo's implied 711 TF / 12,273 tok/s
        (LLAMA2_7B, 4096, 46.1),
        (LLAMA32_1B, 2048, 8.22),
        (LLAMA32_1B, 4096, 9.03),
        (LLAMA32_1B, 8192, 10.64),
    ],
)
def test_flops_per_token_matches_the_torchtitan_anchors(
    config: dict[str, Any], seq: int, gflops: float
) -> None:
    assert ModelShape.from_hf_config(config).flops_per_token(seq) / 1e9 == pytest.approx(
        gflops,
        abs=0.05,  # the anchors are rounded to 3 significant digits
    )


def test_flops_per_token_is_six_n_plus_the_attention_term_by_hand() -> None:
    s = ModelShape.from_hf_config(LLAMA2_7B)
    n = s.total_params - 32000 * 4096  # input embedding excluded, LM head kept
    assert s.flops_per_token(4096) == 6 * n + 12 * 32 * 32 * 128 * 4096


def test_an_untied_model_excludes_only_the_input_embedding_from_flops_params() -> None:
    s = ModelShape.from_hf_config(LLAMA31_8B)
    assert s.non_embedding_params == s.total_params - s.embedding_params
    assert s.lm_head_params == s.embedding_params


def test_a_tied_embedding_is_counted_once_and_kept_as_the_lm_head() -> None:
    s = ModelShape.from_hf_config(LLAMA32_1B)
    assert s.lm_head_params == 0
    assert s.non_embedding_params == s.total_params
    untied = ModelShape.from_hf_config({**LLAMA32_1B, "tie_word_embeddings": False})
    assert untied.total_params == s.total_params + s.embedding_params


def test_kv_heads_default_to_the_attention_heads() -> None:
    cfg = {k: v for k, v in LLAMA2_7B.items() if k != "num_key_value_heads"}
    assert ModelShape.from_hf_config(cfg).num_kv_heads == 32


def test_a_config_missing_shape_keys_names_them() -> None:
    with pytest.raises(ValueError, match="missing hidden_size, num_hidden_layers"):
        ModelShape.from_hf_config(
            {"vocab_size": 8, "intermediate_size": 8, "num_attention_heads": 2}
        )


def test_mfu_is_flops_times_tokens_over_devices_times_peak() -> None:
    assert mfu(1e9, 1000.0, 4, 1e12) == pytest.approx(0.25)


def test_mfu_is_not_reported_without_a_peak() -> None:
    assert mfu(1e9, 1000.0, 4, None) is None
    shape = ModelShape.from_hf_config(LLAMA32_1B)
    assert mfu_for_instance(shape, 128, 1e4, 2, "local-cpu") is None


def test_trainium_mfu_uses_95_tflops_per_neuroncore() -> None:
    shape = ModelShape.from_hf_config(LLAMA2_7B)
    # perf.md: Llama2-7B, 16 nodes, 93.3 seq/s x 4096 → 36.2% (190 TF/chip = 95 TF/core)
    tps = 93.3 * 4096
    assert mfu_for_instance(shape, 4096, tps, 16 * 32, "trn1.32xlarge") == pytest.approx(
        0.362, abs=0.001
    )


def test_the_instance_table_covers_exactly_the_api_instance_types() -> None:
    assert set(INSTANCE_TYPES) == set(get_args(InstanceTypeName))
    for inst in INSTANCE_TYPES.values():
        assert inst.device in DEVICES


@pytest.mark.parametrize(
    ("name", "procs", "resources", "peak", "mem"),
    [
        ("trn1.32xlarge", 32, {"aws.amazon.com/neuron": 16, "vpc.amazonaws.com/efa": 8}, 95, 16),
        ("trn1n.32xlarge", 32, {"aws.amazon.com/neuron": 16, "vpc.amazonaws.com/efa": 16}, 95, 16),
        (
            "trn2.48xlarge",
            64,
            {"aws.amazon.com/neuron": 16, "vpc.amazonaws.com/efa": 16},
            667 / 4,
            24,
        ),
        ("p5.48xlarge", 8, {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 32}, 989, 80),
        ("p5e.48xlarge", 8, {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 32}, 989, 141),
        ("p4d.24xlarge", 8, {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 4}, 312, 40),
        ("p4de.24xlarge", 8, {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 4}, 312, 80),
        ("local-cpu", 2, {}, None, None),
    ],
)
def test_instance_types_know_processes_resources_peak_and_memory(
    name: str, procs: int, resources: dict[str, int], peak: float | None, mem: float | None
) -> None:
    inst = instance_type(name)
    assert inst.processes_per_node == procs
    assert inst.resources == resources
    assert inst.device_spec.peak_bf16_tflops == (None if peak is None else pytest.approx(peak))
    assert inst.device_spec.memory_gib == mem


def test_a_trn1_node_peaks_at_3040_tflops() -> None:
    assert instance_type("trn1.32xlarge").peak_flops_per_node == pytest.approx(3040e12)


def test_an_unknown_instance_type_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown instance type 'trn9.huge'; known: trn1\.2x"):
        instance_type("trn9.huge")
