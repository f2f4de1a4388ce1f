"""The nxd trainer's decisions (everything but the device loop, which needs Trainium).

We test these aspects:
- Batch arithmetic: DP from the world size, micro-batches per step (NxD's num_microbatches
  under PP, gradient accumulation otherwise), clear errors naming the knobs.
- The ``neuronx_distributed_config`` arguments: accepted by the real function's signature (the
  parameter names of NxD 0.17's ``trainer.neuronx_distributed_config``), pipeline settings only
  with PP, ZeRO-1/master-weight/clipping choices, meta-device init.
- AdamW groups honour the configured weight decay (NxD's example pins 0.01), and norms get none.
- Resume checks: same TP/PP (and DP under ZeRO-1) or a message naming both sides; the step from
  ``user_content`` must match the tag; the layout is rebuilt from what a tag records.
- Save/log cadence, the directories created before a save, precompile mode, PP batch stacking.
- ``cpt_training.nxd.train`` imports without torch_xla / neuronx_distributed.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpt_training.config import ConfigError, TrainStage
from cpt_training.nxd import model as nm
from cpt_training.nxd import train as nt
from cpt_training.nxd.layout import LlamaShape, plan_layout

pytestmark = pytest.mark.unit


def stage(**kw):
    base = {
        "backend": "nxd",
        "model_uri": "s3://b/m/",
        "data_uri": "s3://b/d/",
        "checkpoint": {"uri": "s3://b/c/", "every_steps": 10},
        "global_batch_size": 512,
        "micro_batch_size": 1,
        "max_steps": 100,
    }
    par = kw.pop("parallelism", {})
    ckpt = {**base["checkpoint"], **kw.pop("checkpoint", {})}
    return TrainStage.model_validate({**base, "checkpoint": ckpt, "parallelism": par, **kw})


SHAPE = LlamaShape(
    num_layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=32000
)


def test_the_blog_layout_plans_like_the_aws_example():
    # Llama2-70B on 32 trn1.32xlarge: TP8 PP8 -> DP16, GBS 512 -> 32 sequences per replica
    cfg = stage(parallelism={"tensor_parallel": 8, "pipeline_parallel": 8})
    plan = nt.NxdPlan.make(cfg, 32 * 32)
    assert (plan.dp, plan.per_replica_batch, plan.num_microbatches) == (16, 32, 32)
    assert plan.tokens_per_step == 512 * 4096


def test_without_pp_the_replica_batch_is_accumulated():
    plan = nt.NxdPlan.make(stage(parallelism={"tensor_parallel": 8}, micro_batch_size=2), 64)
    assert (plan.dp, plan.micro_batch, plan.grad_accum, plan.num_microbatches) == (8, 2, 32, 1)


@pytest.mark.parametrize(
    ("kw", "world", "needle"),
    [
        ({"parallelism": {"tensor_parallel": 8, "pipeline_parallel": 3}}, 32, "world size 32"),
        ({"global_batch_size": 100, "parallelism": {"tensor_parallel": 8}}, 64, "globalBatchSize"),
        ({"device": "cuda"}, 32, "device 'cuda' with backend nxd"),
    ],
)
def test_impossible_plans_are_refused(kw, world, needle):
    with pytest.raises(ConfigError, match=needle):
        nt.NxdPlan.make(stage(**kw), world)


def test_zero1_and_sequence_parallel_need_something_to_shard_over():
    plan = nt.NxdPlan.make(
        stage(parallelism={"tensor_parallel": 32, "sequence_parallel": True}), 32
    )
    assert plan.dp == 1 and not plan.zero1
    assert plan.sequence_parallel
    plan = nt.NxdPlan.make(stage(parallelism={"sequence_parallel": True}), 32)
    assert not plan.sequence_parallel and plan.zero1


# Parameter names of neuronx_distributed.trainer.trainer.neuronx_distributed_config at the
# 2.28 release (NxD 0.17), as read from its source.
def _nxd_config_signature(
    tensor_parallel_size=1, pipeline_parallel_size=1, expert_parallel_size=1,
    context_parallel_size=1, pipeline_config=None, optimizer_config=None,
    activation_checkpoint_config=None, pad_model=False, sequence_parallel=False,
    model_init_config=None, lora_config=None, mixed_precision_config=None,
    sequential_move_factor=11, lnc_size=1,
):  # fmt: skip
    return None


def _kwargs(cfg, world):
    plan = nt.NxdPlan.make(cfg, world)
    return plan, nt.nxd_config_kwargs(
        cfg,
        plan,
        transformer_layer_cls=nm.CptDecoderLayer,
        leaf_module_cls=nm.LEAF_MODULE_NAMES,
        activation_checkpoint=nm.activation_checkpoint_classes(
            cfg.activation_checkpointing, cfg.seq_len
        ),
        param_init_fn=nm.init_weights,
    )


def test_config_kwargs_bind_to_nxds_signature_and_pp_settings_appear_only_with_pp():
    plan, kw = _kwargs(stage(parallelism={"tensor_parallel": 8, "pipeline_parallel": 4}), 128)
    inspect.signature(_nxd_config_signature).bind(**kw)
    pc = kw["pipeline_config"]
    assert pc["transformer_layer_cls"] is nm.CptDecoderLayer
    assert pc["num_microbatches"] == plan.num_microbatches == 128
    assert pc["input_names"] == ["input_ids", "labels"]
    assert pc["auto_partition"] and pc["broadcast_and_average_loss"]
    assert set(pc["leaf_module_cls"]) == set(nm.LEAF_MODULE_NAMES)
    _, kw = _kwargs(stage(parallelism={"tensor_parallel": 8}), 64)
    inspect.signature(_nxd_config_signature).bind(**kw)
    assert kw["pipeline_config"] is None


def test_precision_optimizer_and_init_settings():
    _, kw = _kwargs(stage(parallelism={"tensor_parallel": 8}, optimizer={"grad_clip": 0.5}), 64)
    assert kw["optimizer_config"] == {
        "zero_one_enabled": True,
        "grad_clipping": True,
        "max_grad_norm": 0.5,
    }
    assert kw["mixed_precision_config"]["use_master_weights"] is True
    assert kw["mixed_precision_config"]["use_fp32_grad_acc"] is True
    assert kw["model_init_config"]["meta_device_init"] is True
    assert kw["model_init_config"]["param_init_fn"] is nm.init_weights
    assert kw["activation_checkpoint_config"] == (nm.CptDecoderLayer,)
    _, kw = _kwargs(stage(parallelism={"zero1": False}, optimizer={"grad_clip": 0.0}), 8)
    assert kw["optimizer_config"]["grad_clipping"] is False
    # NxD refuses master weights without ZeRO-1
    assert kw["mixed_precision_config"]["use_master_weights"] is False


def test_weight_decay_is_the_configured_value_and_norms_get_none():
    cfg_dict = {
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 48,
        "vocab_size": 64,
    }
    layout = plan_layout(LlamaShape.from_config(cfg_dict), tp=1, pp=1)
    model = nm.build_model(nm.ModelSpec(layout), nm.TorchKit())
    groups = nt.param_groups(model.named_parameters(), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert no_decay == {n for n in names.values() if "norm" in n}
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_resume_requires_the_same_degrees_and_names_both_sides():
    plan = nt.NxdPlan.make(stage(parallelism={"tensor_parallel": 8, "pipeline_parallel": 4}), 256)
    layout = plan_layout(SHAPE, tp=8, pp=4)
    saved = nt.world_record(plan, layout)
    nt.check_resume(saved, plan, tag="step_10")
    other = nt.NxdPlan.make(stage(parallelism={"tensor_parallel": 8, "pipeline_parallel": 4}), 512)
    with pytest.raises(ConfigError, match=r"dataParallel=8 in the checkpoint but 16 now"):
        nt.check_resume(saved, other, tag="step_10")
    nt.check_resume(saved, other, tag=nt.PRETRAINED)  # base weights have no optimizer state
    tp4 = nt.NxdPlan.make(stage(parallelism={"tensor_parallel": 4, "pipeline_parallel": 4}), 256)
    with pytest.raises(
        ConfigError,
        match=r"tensorParallel=8 in the checkpoint but 4 now.*"
        r"convert-to-nxd",
    ):
        nt.check_resume(saved, tp4, tag=nt.PRETRAINED)
    with pytest.raises(ConfigError, match="backend 'native'"):
        nt.check_resume({"backend": "native"}, plan, tag="step_10")


def test_the_layout_comes_back_from_what_a_tag_records():
    layout = plan_layout(SHAPE, tp=32, pp=8, kv_size_multiplier=4, qkv_linear=True)
    plan = nt.NxdPlan.make(stage(parallelism={"tensor_parallel": 32, "pipeline_parallel": 8}), 1024)
    assert nt.layout_from_record(SHAPE, nt.world_record(plan, layout)) == layout
    with pytest.raises(ConfigError, match="recorded layout is unusable"):
        nt.layout_from_record(SHAPE, {"tensorParallel": 3, "pipelineParallel": 1})


def test_user_content_round_trips_to_the_resume_step():
    plan = nt.NxdPlan.make(stage(parallelism={"tensor_parallel": 8}), 64)
    layout = plan_layout(SHAPE, tp=8, pp=1)
    uc = nt.user_content(40, plan, layout, attempt=2)
    assert uc["consumedSequences"] == 40 * 512
    assert nt.resume_step(uc, 40, "step_40") == 40
    with pytest.raises(RuntimeError, match="holds step 40, its name says 50"):
        nt.resume_step(uc, 50, "step_50")
    with pytest.raises(RuntimeError, match="not a cpt nxd checkpoint"):
        nt.resume_step(None, 40, "step_40")


def test_save_and_log_cadence():
    cfg = stage(max_steps=25, log_every=5)
    assert [s for s in range(1, 26) if nt.save_due(s, cfg)] == [10, 20, 25]
    assert [s for s in range(8, 26) if nt.log_due(s, 7, cfg)] == [8, 10, 15, 20, 25]


def test_every_node_creates_the_tag_directories_nxd_writes_into(tmp_path):
    dirs = nt.tag_dirs(tmp_path, "step_10")
    assert dirs == [tmp_path / "step_10", tmp_path / "step_10/model", tmp_path / "step_10/optim"]


def test_precompile_mode_runs_a_few_steps_and_never_checkpoints():
    assert nt.is_precompile({"NEURON_EXTRACT_GRAPHS_ONLY": "1"})
    assert not nt.is_precompile({}) and not nt.is_precompile({"NEURON_EXTRACT_GRAPHS_ONLY": "0"})
    assert nt.steps_this_process(stage(), precompile=True) == nt.PRECOMPILE_DEFAULT_STEPS
    assert nt.steps_this_process(stage(stop_after_steps=7), precompile=True) == 7
    assert nt.steps_this_process(stage(), precompile=False) is None


def test_pp_step_batches_stack_the_micro_batches_in_order():
    mbs = [np.full((2, 8), i, dtype=np.int64) for i in range(3)]
    out = nt.stack_micro_batches(mbs, 8)
    assert out.shape == (6, 8) and out[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="hold 8 tokens but seqLen is 16"):
        nt.stack_micro_batches(mbs, 16)


def test_tensorboard_goes_per_attempt_under_the_checkpoint_root():
    assert nt.tensorboard_uri(stage(attempt=3)) == "s3://b/c/tensorboard/attempt-3"


def test_importing_the_trainer_needs_neither_torch_xla_nor_neuronx_distributed():
    code = (
        "import sys, cpt_training.nxd.train, cpt_training.nxd.convert, cpt_training.nxd.export;"
        "bad = [m for m in ('torch_xla', 'neuronx_distributed') if m in sys.modules];"
        "assert not bad, bad"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    assert res.returncode == 0, res.stderr


def test_run_refuses_a_bad_plan_before_touching_the_hardware(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "30")
    with pytest.raises(ConfigError, match="world size 30"):
        nt.run(stage(parallelism={"tensor_parallel": 8}))
