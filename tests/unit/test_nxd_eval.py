"""The nxd backend's held-out evaluation per source: which rows each DP rank scores
(cpt_training.held_out, shared with native), and the exact mean through NxD's two model
entry points (``model(ids, labels)`` without PP, ``run_eval`` with PP, whose micro-batch and DP
averaging the loss heads' summing undoes). The model is cpt's own nxd Llama on torch layers;
NxD itself runs in the stand-in integration test (tests/integration/test_nxd_dryrun.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from test_nxd_model import make, ours_from

from cpt_training.held_out import deal, eval_due, mean_losses
from cpt_training.nxd import model as nm
from cpt_training.nxd.evaluate import NxdHeldOutEval, labels_for
from cpt_training.nxd.plan import NxdPlan

pytestmark = pytest.mark.unit

SEQ = 16


class Blocks:
    """The part of TokenBlocks the evaluation reads: held-out blocks per source."""

    def __init__(self, held: dict[str, int], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.block_size = SEQ
        self.source_names = list(held)
        self.rows = [rng.integers(0, 96, (n, SEQ)) for n in held.values()]

    def held_out(
        self, batch_size: int, max_blocks: int | None = None, source: int | None = None
    ) -> Iterator[np.ndarray]:
        assert source is not None
        rows = self.rows[source][:max_blocks]
        for i in range(0, len(rows), batch_size):
            yield rows[i : i + batch_size]


def test_every_rank_gets_the_same_padded_count_and_the_ranks_cover_each_block_once() -> None:
    blocks: Any = Blocks({"domain": 11, "replay": 3, "empty": 0})
    for dp, multiple in [(1, 1), (4, 1), (4, 4), (3, 2)]:
        shards = [deal(blocks, 8, r, dp, multiple=multiple) for r in range(dp)]
        for i, name in enumerate(["domain", "replay", "empty"]):
            mine = [s[i] for s in shards]
            assert {len(s.rows) for s in mine} == {len(mine[0].rows)}  # same forwards
            assert len(mine[0].rows) % multiple == 0
            real = np.concatenate([s.rows[s.real] for s in mine])
            expect = blocks.rows[i][:8]
            assert sorted(map(bytes, real)) == sorted(map(bytes, expect)), (dp, multiple, name)
            assert all(not s.rows[~s.real].any() for s in mine)  # padding is zeros
            assert mine[0].total_blocks == len(expect)
    with pytest.raises(ValueError, match="dp_rank"):
        deal(blocks, 8, 2, 2)


def test_evaluations_run_every_n_steps_and_at_the_last() -> None:
    assert [s for s in range(1, 11) if eval_due(s, 4, 10)] == [4, 8, 10]
    assert not any(eval_due(s, None, 10) for s in range(1, 11))


def test_padding_rows_are_ignored_targets_and_means_divide_by_real_targets() -> None:
    rows = np.arange(2 * SEQ).reshape(2, SEQ)
    labels = labels_for(rows, np.array([True, False]))
    assert (labels[0] == rows[0]).all() and (labels[1] == -100).all()
    shards = deal(Blocks({"a": 2, "b": 0}), 8, 0, 1)  # type: ignore[arg-type]
    assert mean_losses(shards, [2 * (SEQ - 1) * 3.0, 0.0], SEQ) == {"a": 3.0, "b": None}


def test_the_loss_head_sums_on_request_and_only_its_own_model_is_switched() -> None:
    cfg, hf = make()
    model = ours_from(cfg, hf)
    ids = torch.randint(0, 96, (2, SEQ))
    labels = ids.clone()
    labels[1] = -100
    with torch.no_grad():
        mean = model(ids, labels)
        assert nm.set_loss_reduction(model, "sum") == 1
        summed = model(ids, labels)
        nm.set_loss_reduction(model, "mean")
    torch.testing.assert_close(summed, mean * (SEQ - 1))
    with pytest.raises(ValueError, match="reduction"):
        nm.set_loss_reduction(model, "max")
    assert nm.set_loss_reduction(torch.nn.Linear(2, 2), "sum") == 0


class CpuXm:
    """torch_xla's xla_model for one process on CPU."""

    REDUCE_SUM = "sum"

    @staticmethod
    def mark_step() -> None:
        pass

    @staticmethod
    def all_reduce(op: str, t: torch.Tensor, groups: Any = None) -> torch.Tensor:
        return t


class PipelineLike(torch.nn.Module):
    """What NxD's pipeline wrapper does with a run_eval batch: split it into its micro-batches,
    average their losses (then over DP ranks: one here), return it on the CPU."""

    def __init__(self, module: torch.nn.Module, micro_batches: int) -> None:
        super().__init__()
        self.module, self.micro_batches = module, micro_batches

    def run_eval(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ids, labs = input_ids.chunk(self.micro_batches), labels.chunk(self.micro_batches)
        losses = [self.module(i, lab) for i, lab in zip(ids, labs, strict=True)]
        return (sum(losses) / len(losses)).cpu()


def plan(pp: int, micro: int, accum: int) -> NxdPlan:
    return NxdPlan(
        world_size=pp,
        tp=1,
        pp=pp,
        dp=1,
        micro_batch=micro,
        grad_accum=accum,
        seq_len=SEQ,
        zero1=False,
        sequence_parallel=False,
    )


@pytest.mark.parametrize(
    ("pp", "micro", "accum"), [(1, 2, 1), (1, 4, 3), (2, 1, 4), (2, 2, 3)], ids=str
)
def test_both_nxd_entry_points_give_the_exact_mean_over_the_real_blocks(
    pp: int, micro: int, accum: int
) -> None:
    cfg, hf = make()
    model = ours_from(cfg, hf).train()
    blocks: Any = Blocks({"domain": 7, "replay": 2, "none": 0}, seed=1)
    ev = NxdHeldOutEval(blocks, 5, plan(pp, micro, accum), dp_rank=0)
    wrapper = PipelineLike(model, accum) if pp > 1 else model
    got = ev.run(wrapper, torch.device("cpu"), CpuXm, None)
    with torch.no_grad():
        ref = {
            name: float(model(torch.from_numpy(r[:5]), torch.from_numpy(r[:5])))
            for name, r in zip(blocks.source_names, blocks.rows, strict=True)
            if len(r)
        }
    assert got["none"] is None
    assert got["domain"] == pytest.approx(ref["domain"], rel=1e-5)
    assert got["replay"] == pytest.approx(ref["replay"], rel=1e-5)
    # Training resumes as it was: mean loss, training mode.
    assert model.training and model.loss_head.reduction == "mean"
