"""Held-out loss per data source during training (``evalEverySteps``), sharded over the
data-parallel ranks: the native backend's forward over the rows
:func:`cpt_training.held_out.deal` gives this rank (the same blocks the nxd backend scores).

Padding rows get targets that are all ignored, so they add neither loss nor tokens; one
all-reduce of ``[sources, 2]`` (loss sum, target count) gives every source's mean.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from cpt_training.data import TokenBlocks
from cpt_training.held_out import deal
from cpt_training.native.llama import IGNORE_INDEX, shift_targets

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input ids, targets) -> summed loss over the non-ignored targets (the trainer's model)."""


class HeldOutEval:
    """The held-out blocks of this DP rank, per source, and the loop that scores them."""

    def __init__(
        self, blocks: TokenBlocks, per_source: int, dp_rank: int, dp_size: int, batch: int
    ) -> None:
        self.shards = deal(blocks, per_source, dp_rank, dp_size)
        self.names = [s.name for s in self.shards]
        self.batch = max(1, batch)

    @property
    def empty(self) -> bool:
        return not any(len(s.rows) for s in self.shards)

    @torch.no_grad()
    def run(
        self,
        forward: Forward,
        device: torch.device,
        group: dist.ProcessGroup | None,
    ) -> dict[str, float | None]:
        """Mean held-out loss per source (None for a source without held-out blocks)."""
        sums = torch.zeros((len(self.names), 2), dtype=torch.float64, device=device)
        for i, shard in enumerate(self.shards):
            for rows, real in shard.batches(self.batch):
                ids = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
                targets = shift_targets(ids)
                targets[~torch.from_numpy(real).to(device)] = IGNORE_INDEX
                sums[i, 0] += forward(ids, targets).double()
                sums[i, 1] += (targets != IGNORE_INDEX).sum()
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        out: dict[str, float | None] = {}
        for name, (loss, count) in zip(self.names, sums.tolist(), strict=True):
            out[name] = loss / count if count else None
        return out
