"""Held-out loss per data source during training (``evalEverySteps``), sharded over the
data-parallel ranks.

Why sharded and padded: every rank runs the model's forward the same number of times (FSDP
gathers parameters in each forward, so a rank that skipped one would hang the others). Source
``i``'s first ``eval_blocks`` held-out blocks are dealt round-robin to the DP ranks; a rank short
of a block runs a padding block whose targets are all ignored (it adds neither loss nor
tokens). One all-reduce of ``[sources, 2]`` (loss sum, target count) gives every source's mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from cpt_training.data import TokenBlocks
from cpt_training.native.llama import IGNORE_INDEX, shift_targets

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input ids, targets) -> summed loss over the non-ignored targets (the trainer's model)."""


class HeldOutEval:
    """The held-out blocks of this DP rank, per source, and the loop that scores them."""

    def __init__(
        self, blocks: TokenBlocks, per_source: int, dp_rank: int, dp_size: int, batch: int
    ) -> None:
        self.names = list(blocks.source_names)
        self.batch = max(1, batch)
        self.shards: list[list[tuple[np.ndarray, bool]]] = []
        """Per source: (block, real) of this rank; every rank has the same count."""
        for i in range(len(self.names)):
            parts = list(blocks.held_out(per_source, max_blocks=per_source, source=i))
            arr = np.concatenate(parts) if parts else np.zeros((0, blocks.block_size), np.int64)
            mine = arr[dp_rank::dp_size]
            count = math.ceil(len(arr) / dp_size)
            pad = np.zeros((count - len(mine), blocks.block_size), dtype=np.int64)
            self.shards.append([(r, True) for r in mine] + [(r, False) for r in pad])

    @property
    def empty(self) -> bool:
        return not any(self.shards)

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
            for start in range(0, len(shard), self.batch):
                part = shard[start : start + self.batch]
                ids = torch.from_numpy(np.stack([r for r, _ in part])).to(device)
                targets = shift_targets(ids)
                real = torch.tensor([ok for _, ok in part], device=device)
                targets[~real] = IGNORE_INDEX
                sums[i, 0] += forward(ids, targets).double()
                sums[i, 1] += (targets != IGNORE_INDEX).sum()
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        out: dict[str, float | None] = {}
        for name, (loss, count) in zip(self.names, sums.tolist(), strict=True):
            out[name] = loss / count if count else None
        return out
