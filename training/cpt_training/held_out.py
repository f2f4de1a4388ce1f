"""Which held-out blocks each data-parallel rank scores in an in-training evaluation
(``evalEverySteps``): the part every backend shares, so native and nxd evaluate the same blocks.

Source ``i``'s first ``eval_blocks`` held-out blocks (stored order) are dealt round-robin to the
DP ranks. Every rank gets the same number of rows, padded with rows marked not real: a rank
that skipped a forward would hang the others (FSDP gathers parameters in each forward; NxD's
tensor- and pipeline-parallel layers communicate in each forward). ``multiple`` rounds that
count up so every forward sees the same batch shape (XLA compiles one graph, not one per tail).
The trainers turn padding rows into ignored targets, so they add neither loss nor tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cpt_training.data import TokenBlocks


@dataclass(frozen=True)
class HeldOutShard:
    """One source's rows for this rank."""

    name: str
    rows: np.ndarray
    """int64 [n, block_size]: this rank's blocks, then padding (zeros)."""
    real: np.ndarray
    """bool [n]: which rows are held-out blocks (the rest is padding)."""
    total_blocks: int
    """The source's evaluated blocks over all ranks (what the mean divides by)."""

    def batches(self, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(rows, real) ``size`` rows at a time (the last may be short unless ``multiple``
        made the count a multiple of ``size``)."""
        return [
            (self.rows[i : i + size], self.real[i : i + size])
            for i in range(0, len(self.rows), size)
        ]


def deal(
    blocks: TokenBlocks, per_source: int, dp_rank: int, dp_size: int, multiple: int = 1
) -> list[HeldOutShard]:
    """This rank's share of every source's first ``per_source`` held-out blocks."""
    if not 0 <= dp_rank < dp_size or per_source < 1 or multiple < 1:
        raise ValueError(
            f"need 0 <= dp_rank ({dp_rank}) < dp_size ({dp_size}), per_source ({per_source}) "
            f">= 1 and multiple ({multiple}) >= 1"
        )
    out = []
    for i, name in enumerate(blocks.source_names):
        parts = list(blocks.held_out(per_source, max_blocks=per_source, source=i))
        arr = np.concatenate(parts) if parts else np.zeros((0, blocks.block_size), np.int64)
        mine = arr[dp_rank::dp_size]
        count = math.ceil(len(arr) / dp_size)
        count = math.ceil(count / multiple) * multiple
        pad = np.zeros((count - len(mine), blocks.block_size), dtype=np.int64)
        out.append(
            HeldOutShard(
                name=name,
                rows=np.concatenate([mine.astype(np.int64), pad]),
                real=np.arange(count) < len(mine),
                total_blocks=len(arr),
            )
        )
    return out


def eval_due(step: int, every: int | None, max_steps: int) -> bool:
    """Every ``every`` steps and at the last step (never without ``every``)."""
    return every is not None and (step % every == 0 or step == max_steps)


def mean_losses(
    shards: list[HeldOutShard], sums: list[float], block_size: int
) -> dict[str, float | None]:
    """Mean loss per source from the summed loss over all ranks: every real block predicts
    ``block_size - 1`` targets (None for a source without held-out blocks)."""
    out: dict[str, float | None] = {}
    for shard, total in zip(shards, sums, strict=True):
        targets = shard.total_blocks * (block_size - 1)
        out[shard.name] = total / targets if targets else None
    return out
