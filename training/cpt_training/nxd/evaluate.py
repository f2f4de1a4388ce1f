"""Held-out loss per data source during nxd training (``evalEverySteps``), through NxD's model
wrapper: ``model(ids, labels)`` without pipeline parallelism, ``model.run_eval(...)`` with it.

Every rank takes part (tensor- and pipeline-parallel layers communicate in each forward) and
scores its DP rank's rows of :func:`cpt_training.held_out.deal`, the same blocks the native
backend scores. The loss heads sum instead of averaging while this runs
(:func:`~cpt_training.nxd.model.set_loss_reduction`), so padding rows (all targets ignored)
change nothing and the mean per source is exact:

* without PP, a forward returns this rank's summed loss; the per-source sums stay on the
  device and one all-reduce over the DP replica groups (as for the training loss) adds the
  ranks' shares;
* with PP, NxD splits the batch into its ``num_microbatches`` micro-batches, averages their
  losses, averages that over the DP ranks and broadcasts it to every pipeline stage
  (``broadcast_and_average_loss``): times micro-batches times DP it is the sum over all ranks.

Every forward has the same shape (rows are padded to a multiple of the batch), so XLA
compiles one evaluation graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cpt_training.data import TokenBlocks
from cpt_training.held_out import HeldOutShard, deal, mean_losses
from cpt_training.nxd.plan import NxdPlan

IGNORE = -100


def labels_for(rows: np.ndarray, real: np.ndarray) -> np.ndarray:
    """The input ids as labels (the loss head shifts them), all ignored on padding rows."""
    labels = np.array(rows, dtype=np.int64, copy=True)
    labels[~real] = IGNORE
    return labels


class NxdHeldOutEval:
    """This rank's held-out rows per source and the loop that scores them."""

    def __init__(self, blocks: TokenBlocks, per_source: int, plan: NxdPlan, dp_rank: int) -> None:
        self.plan = plan
        # PP: one run_eval takes all of NxD's micro-batches at once, like run_train.
        self.batch = plan.micro_batch * plan.num_microbatches
        self.block_size = blocks.block_size
        self.shards: list[HeldOutShard] = deal(
            blocks, per_source, dp_rank, plan.dp, multiple=self.batch
        )

    def run(self, model: Any, device: Any, xm: Any, dp_groups: Any) -> dict[str, float | None]:
        """Mean held-out loss per source (None for a source without held-out blocks); the
        same result on every rank. ``xm`` is torch_xla's ``xla_model``."""
        import torch

        from cpt_training.nxd.model import set_loss_reduction

        pp = self.plan.pp > 1
        set_loss_reduction(model, "sum")
        if not pp:
            model.eval()  # NxD's pipeline switches its own stages in run_eval
        try:
            with torch.no_grad():
                if pp:
                    sums = [self._pipelined(model, shard, device) for shard in self.shards]
                else:
                    per_source = torch.stack(
                        [self._local(model, shard, device, xm) for shard in self.shards]
                    )
                    total = xm.all_reduce(xm.REDUCE_SUM, per_source, groups=dp_groups)
                    sums = [float(v) for v in total.cpu().tolist()]
        finally:
            set_loss_reduction(model, "mean")
            if not pp:
                model.train()
        return mean_losses(self.shards, sums, self.block_size)

    def _tensors(self, rows: np.ndarray, real: np.ndarray, device: Any) -> tuple[Any, Any]:
        import torch

        ids = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(device)
        return ids, torch.from_numpy(labels_for(rows, real)).to(device)

    def _local(self, model: Any, shard: HeldOutShard, device: Any, xm: Any) -> Any:
        """This rank's summed loss over the shard, on the device."""
        import torch

        total = torch.zeros((), dtype=torch.float32, device=device)
        for rows, real in shard.batches(self.batch):
            ids, labels = self._tensors(rows, real, device)
            total = total + model(ids, labels).float()
            xm.mark_step()  # one evaluation graph, reused for every batch
        return total

    def _pipelined(self, model: Any, shard: HeldOutShard, device: Any) -> float:
        """The summed loss over every DP rank's shard (NxD already reduced over DP)."""
        scale = self.plan.num_microbatches * self.plan.dp
        total = 0.0
        for rows, real in shard.batches(self.batch):
            ids, labels = self._tensors(rows, real, device)
            loss = model.run_eval(input_ids=ids, labels=labels)
            total += float(loss) * scale
        return total
