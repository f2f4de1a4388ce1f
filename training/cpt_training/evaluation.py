"""Held-out evaluation per data source, before and after: what the run learned of each source
and what it forgot.

Why per source: a single held-out loss over a domain + replay mixture hides the trade-off a
continual-pretraining run makes. The export stage evaluates the base model and the final model
on the same held-out blocks of every source (the first ``eval_blocks`` of each, in stored
order); ``eval.json`` gets, per source, loss and perplexity before and after and the change
(after - before: negative is adaptation on a domain source, positive is forgetting on a replay
source), plus the token-weighted totals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cpt_training.data import TokenBlocks


@torch.no_grad()
def eval_loss(model: Any, blocks: list[torch.Tensor], batch_size: int = 4) -> tuple[float, int]:
    """Mean next-token cross entropy over ``blocks`` (each [seq] input ids) and the number of
    predicted tokens: HF's own loss (``labels=input_ids``), weighted by tokens. Without
    autograd: the export evaluates whole models on CPU, where saved activations would cost
    as much memory as a training step's."""
    total, tokens = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = torch.stack(blocks[i : i + batch_size]).to(torch.long)
        out = model(input_ids=ids, labels=ids)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(out.loss) * n
        tokens += n
    if tokens == 0:
        return float("nan"), 0
    return total / tokens, tokens


@dataclass(frozen=True)
class SourceBlocks:
    name: str
    blocks: list[torch.Tensor]


def held_out_by_source(data_uri: str, per_source: int) -> list[SourceBlocks]:
    """Up to ``per_source`` held-out blocks of every tokenized source (a v1 dataset: one
    source named ``all``)."""
    tb = TokenBlocks(data_uri)
    out = []
    for i, name in enumerate(tb.source_names):
        rows: list[torch.Tensor] = []
        for arr in tb.held_out(max(1, per_source), max_blocks=per_source, source=i):
            rows.extend(torch.from_numpy(np.ascontiguousarray(r, dtype=np.int64)) for r in arr)
        out.append(SourceBlocks(name, rows))
    return out


def _ppl(loss: float | None) -> float | None:
    return None if loss is None or not math.isfinite(loss) or loss > 700 else math.exp(loss)


def _score(loss: float, tokens: int) -> dict[str, Any]:
    value = loss if tokens and math.isfinite(loss) else None
    return {"loss": value, "perplexity": _ppl(value)}


def compare(
    before: Any, after: Any, sources: list[SourceBlocks], batch_size: int = 4
) -> dict[str, Any]:
    """``{"sources": {name: ...}, "totals": ...}`` for the ``before`` and ``after`` models."""
    per: dict[str, Any] = {}
    sums = {"before": 0.0, "after": 0.0}
    total_tokens = 0
    for src in sources:
        b_loss, tokens = eval_loss(before, src.blocks, batch_size)
        a_loss, _ = eval_loss(after, src.blocks, batch_size)
        entry: dict[str, Any] = {
            "blocks": len(src.blocks),
            "tokens": tokens,
            "before": _score(b_loss, tokens),
            "after": _score(a_loss, tokens),
        }
        entry["lossChange"] = (
            None if not tokens else entry["after"]["loss"] - entry["before"]["loss"]
        )
        per[src.name] = entry
        if tokens:
            sums["before"] += b_loss * tokens
            sums["after"] += a_loss * tokens
            total_tokens += tokens
    totals: dict[str, Any] = {"blocks": sum(len(s.blocks) for s in sources), "tokens": total_tokens}
    for key in ("before", "after"):
        totals[key] = _score(sums[key] / total_tokens if total_tokens else math.nan, total_tokens)
    totals["lossChange"] = (
        None if not total_tokens else totals["after"]["loss"] - totals["before"]["loss"]
    )
    return {"sources": per, "totals": totals}
