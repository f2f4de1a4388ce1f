"""Batch arithmetic and parallel layout are checked before anything expensive happens."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")

from cpt_training.config import ConfigError, TrainStage
from cpt_training.native.llama import LlamaArgs
from cpt_training.native.parallelize import Layout, check_tp_shapes
from cpt_training.native.train import Plan

pytestmark = pytest.mark.unit


def _cfg(**kw: Any) -> TrainStage:
    base: dict[str, Any] = {"modelUri": "/m", "dataUri": "/d", "checkpoint": {"uri": "/c"}}
    return TrainStage.model_validate({**base, **kw})


def test_gradient_accumulation_is_global_over_micro_times_dp() -> None:
    plan = Plan.make(_cfg(globalBatchSize=64, microBatchSize=2, seqLen=128), world_size=8)
    assert (plan.layout.dp, plan.layout.tp, plan.grad_accum) == (8, 1, 4)
    assert plan.tokens_per_step == 64 * 128


def test_tensor_parallel_ranks_share_their_data_parallel_slot() -> None:
    cfg = _cfg(globalBatchSize=16, microBatchSize=1, parallelism={"tensorParallel": 4})
    plan = Plan.make(cfg, world_size=8)
    assert (plan.layout.dp, plan.layout.tp, plan.grad_accum) == (2, 4, 8)


def test_a_global_batch_that_does_not_divide_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"globalBatchSize \(6\) must be a multiple of .* = 4"):
        Plan.make(_cfg(globalBatchSize=6, microBatchSize=2), world_size=2)


def test_pipeline_parallelism_and_indivisible_tp_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="pipelineParallel=2"):
        Plan.make(_cfg(parallelism={"pipelineParallel": 2}), world_size=2)
    with pytest.raises(ConfigError, match="tensorParallel=3 must divide the world size"):
        Plan.make(_cfg(parallelism={"tensorParallel": 3}), world_size=4)
    assert Layout.plan(8, 2) == Layout(dp=4, tp=2)


def test_tp_must_divide_heads_and_the_mlp() -> None:
    a = LlamaArgs(
        vocab_size=10,
        hidden_size=48,
        intermediate_size=100,
        num_layers=1,
        num_heads=6,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        max_position_embeddings=16,
    )
    check_tp_shapes(a, 2)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\).*intermediate_size \(100\)"):
        check_tp_shapes(a, 3)  # 6 heads divide by 3; 2 kv heads and 100 do not
