"""The nxd precision recipe (``cpt_training.nxd.precision``), one test per row of the table in
docs/nxd.md ("Precision recipe"), each checked where it takes effect: the pod env the operator
writes (``neuron_env``), NxD's ``mixed_precision_config`` / ``optimizer_config`` the trainer
passes, and the optimizer class and layer dtype the trainer builds.

We also test:
- The table in docs/nxd.md lists exactly these rows (a changed recipe must change the doc).
- cpt's fp32-moment AdamW: fp32 moments for bf16 weights, the same update as torch's AdamW on
  fp32 weights, and bf16 moments would have lost what it keeps.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cpt_training.config import TrainStage
from cpt_training.nxd import env as nxd_env
from cpt_training.nxd import precision
from cpt_training.nxd import train as nt
from cpt_training.nxd.optim import AdamWFP32States

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def stage(precision_: str, zero1: bool, tp: int = 8, pp: int = 1) -> TrainStage:
    return TrainStage.model_validate(
        {
            "backend": "nxd",
            "run_name": "r",
            "model_uri": "s3://b/m/",
            "data_uri": "s3://b/d/",
            "checkpoint": {"uri": "s3://b/c/"},
            "precision": precision_,
            "global_batch_size": 64,
            "parallelism": {"zero1": zero1, "tensor_parallel": tp, "pipeline_parallel": pp},
        }
    )


def effect(cfg: TrainStage, world: int) -> dict[str, object]:
    """What the case turns into: pod env, NxD arguments, optimizer class, layer dtype."""
    plan = nt.NxdPlan.make(cfg, world)
    env = nxd_env.neuron_env(cfg, world_size=world, compile_cache_uri=None)
    rec = nt.precision_recipe(cfg, plan)
    return {
        "dp": plan.dp,
        "sr": env["NEURON_RT_STOCHASTIC_ROUNDING_EN"],
        "downcast": env.get("XLA_DOWNCAST_BF16"),
        "functionalization": env.get("XLA_DISABLE_FUNCTIONALIZATION"),
        "zero1": nt.optimizer_config(cfg, plan)["zero_one_enabled"],
        "mp": nt.mixed_precision_config(cfg, plan),
        "optimizer": AdamWFP32States.for_recipe(rec),
        "dtype": getattr(torch, rec.layer_dtype),
    }


MASTER = {
    "use_master_weights": True,
    "use_fp32_grad_acc": True,
    "use_master_weights_in_ckpt": False,
}
NO_MASTER = {
    "use_master_weights": False,
    "use_fp32_grad_acc": False,
    "use_master_weights_in_ckpt": False,
}


def test_row_bf16_zero1_dp_above_1_master_weights_adamw_no_rounding():
    e = effect(stage("bf16", True, tp=8, pp=4), world=128)
    assert e["dp"] == 4 and e["zero1"] is True
    assert e["mp"] == MASTER
    assert e["optimizer"] is torch.optim.AdamW
    assert e["dtype"] is torch.bfloat16
    # "0", not unset: NxD's trainer then halves the ZeRO-1 bucket cap for bf16 torch tensors
    assert e["sr"] == "0" and e["downcast"] == "0" and e["functionalization"] == "0"


def test_row_bf16_zero1_at_dp_1_runs_without_zero1_and_rounds_stochastically():
    e = effect(stage("bf16", True, tp=32), world=32)
    assert e["dp"] == 1 and e["zero1"] is False
    assert e["mp"] == NO_MASTER
    assert e["optimizer"] is AdamWFP32States
    assert e["dtype"] is torch.bfloat16
    assert e["sr"] == "1" and e["downcast"] is None and e["functionalization"] is None


def test_row_bf16_without_zero1_fp32_moment_adamw_and_stochastic_rounding():
    e = effect(stage("bf16", False, tp=8), world=64)
    assert e["dp"] == 8 and e["zero1"] is False
    assert e["mp"] == NO_MASTER
    assert e["optimizer"] is AdamWFP32States
    assert e["dtype"] is torch.bfloat16
    assert e["sr"] == "1" and e["downcast"] is None and e["functionalization"] is None


def test_row_fp32_zero1_dp_above_1_shards_fp32_adamw_without_master_copy():
    e = effect(stage("fp32", True, tp=8), world=64)
    assert e["zero1"] is True and e["mp"] == NO_MASTER
    assert e["optimizer"] is torch.optim.AdamW and e["dtype"] is torch.float32
    assert e["sr"] == "0" and e["downcast"] is None and e["functionalization"] == "0"


def test_row_fp32_zero1_at_dp_1_is_plain_fp32_adamw():
    e = effect(stage("fp32", True, tp=32), world=32)
    assert e["zero1"] is False and e["mp"] == NO_MASTER
    assert e["optimizer"] is torch.optim.AdamW and e["dtype"] is torch.float32
    assert e["sr"] == "0" and e["functionalization"] is None


def test_row_fp32_without_zero1_is_plain_fp32_adamw():
    e = effect(stage("fp32", False, tp=8), world=64)
    assert e["zero1"] is False and e["mp"] == NO_MASTER
    assert e["optimizer"] is torch.optim.AdamW and e["dtype"] is torch.float32
    assert e["sr"] == "0" and e["functionalization"] is None


def test_docs_table_lists_every_case_with_its_rounding():
    text = (ROOT / "docs" / "nxd.md").read_text()
    section = text.split("## Precision recipe", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if re.match(r"\| (bf16|fp32) ", r)]
    cases = {
        ("bf16", "true", "> 1"): precision.recipe("bf16", True, 2),
        ("bf16", "true", "1"): precision.recipe("bf16", True, 1),
        ("bf16", "false", "any"): precision.recipe("bf16", False, 4),
        ("fp32", "true", "> 1"): precision.recipe("fp32", True, 2),
        ("fp32", "true", "1"): precision.recipe("fp32", True, 1),
        ("fp32", "false", "any"): precision.recipe("fp32", False, 4),
    }
    assert len(rows) == len(cases)
    for row in rows:
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        rec = cases[(cells[0], cells[1], cells[2])]
        assert cells[3] == ("on" if rec.zero1 else "off"), row
        assert cells[4] == rec.layer_dtype, row
        assert cells[7] == rec.env().get("XLA_DOWNCAST_BF16", "unset"), row
        assert cells[8] == ("1" if rec.stochastic_rounding else "0"), row
        assert "NxD" in row or "n/a" in row


def test_fp32_moment_adamw_matches_torch_adamw_and_keeps_fp32_state_for_bf16_weights():
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    grads = [torch.randn(64, 32) * 1e-3 for _ in range(3)]
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    ref = torch.nn.Parameter(w0.clone())
    ref_opt = torch.optim.AdamW([ref], **kw)
    mine = torch.nn.Parameter(w0.clone())
    my_opt = AdamWFP32States([mine], **kw)
    for g in grads:
        ref.grad, mine.grad = g.clone(), g.clone()
        ref_opt.step()
        my_opt.step()
    torch.testing.assert_close(mine.data, ref.data, rtol=1e-5, atol=1e-6)

    half = torch.nn.Parameter(w0.to(torch.bfloat16))
    half_opt = AdamWFP32States([half], **kw)
    half.grad = grads[0].to(torch.bfloat16)
    half_opt.step()
    state = half_opt.state[half]
    assert half.dtype is torch.bfloat16
    assert state["exp_avg"].dtype is torch.float32 and state["exp_avg_sq"].dtype is torch.float32
    # a second moment of 1e-6-sized squares: bf16 keeps ~3 significant digits of it, fp32 all
    exact = (1 - 0.95) * grads[0].to(torch.bfloat16).float() ** 2
    torch.testing.assert_close(state["exp_avg_sq"], exact, rtol=1e-6, atol=0)
    lost = (exact.to(torch.bfloat16).float() - exact).abs() / exact
    assert lost.max() > 1e-3  # what bf16 moments would have dropped


def test_recipe_refuses_a_data_parallel_degree_below_one():
    with pytest.raises(ValueError, match="data-parallel degree"):
        precision.recipe("bf16", True, 0)


def test_the_seed_runs_pytorchjob_and_stage_config_follow_the_bf16_zero1_row():
    """examples/run.yaml (bf16, ZeRO-1, DP 16): its training pods' env and the stage config
    the trainer reads give row 1 of the table."""
    import json

    import yaml

    from cpt_operator.api.models import ContinualPretrainSpec
    from cpt_operator.api.planner import plan
    from cpt_operator.builders import pytorchjob, stages
    from cpt_operator.builders.jobs import RunRef
    from cpt_training.config import STAGE_CONFIG_ENV

    body = yaml.safe_load((ROOT / "examples" / "run.yaml").read_text())
    spec = ContinualPretrainSpec.model_validate(body["spec"])
    p = plan(spec)
    assert p.ok and p.data_parallel == 16
    cfg = stages.train_stage(spec, "seed", 1, "ml")
    job = pytorchjob.training_job(spec, RunRef("seed", "ml", "uid-1"), cfg)
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    stage = TrainStage.model_validate(json.loads(env[STAGE_CONFIG_ENV]))
    rec = nt.precision_recipe(stage, nt.NxdPlan.make(stage, p.world_size))
    assert rec == precision.recipe("bf16", True, 16)
    assert rec.master_weights and rec.optimizer == "adamw" and rec.layer_dtype == "bfloat16"
    assert env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "0"
    assert env["XLA_DISABLE_FUNCTIONALIZATION"] == "0"
    assert env["XLA_DOWNCAST_BF16"] == "0"
    assert env["FI_EFA_ENABLE_SHM_TRANSFER"] == "1" and env["FI_LOG_LEVEL"] == "warn"
