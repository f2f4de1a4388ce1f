"""The data mixture in ``cpt plan``: tokens each source gives the run and how many passes over
it that is, with a warning for every source repeated.

Why a module of its own: the maths (shares from weights, epochs from sizes) is small but
has to match what the trainer does (``cpt_training.mixture``), and the planner is large.

Source sizes come from the tokenized data's ``manifest.json`` when it is local and already
written (exact: blocks per source); otherwise a local source's file bytes give an estimate
(``BYTES_PER_TOKEN``); S3 and Hub sources are not read at planning time (size unknown).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt_operator.api.models import ContinualPretrainSpec
from cpt_training.config import source_name
from cpt_training.shares import WINDOW, quotas

BYTES_PER_TOKEN = 4.0
"""Rough bytes of text per token of a Llama-family BPE tokenizer on English prose."""


@dataclass(frozen=True)
class SourcePlan:
    index: int
    name: str
    weight: float | None
    share: float | None
    """Fraction of the training tokens drawn from it (None: by size, sizes unknown)."""
    size_tokens: int | None
    exact: bool
    """size_tokens from the manifest (True) or estimated from file bytes (False)."""
    tokens: int | None
    epochs: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weight": self.weight,
            "share": self.share,
            "sourceTokens": self.size_tokens,
            "sourceTokensExact": self.exact,
            "trainTokens": self.tokens,
            "epochs": self.epochs,
        }


def _local(uri: str | None, base_dir: Path) -> Path | None:
    if uri is None or ("://" in uri and not uri.startswith("file://")):
        return None
    path = Path(uri.removeprefix("file://"))
    return path if path.is_absolute() else base_dir / path


def _manifest_sizes(data_uri: str, base_dir: Path, n: int) -> list[int] | None:
    root = _local(data_uri, base_dir)
    if root is None or not (root / "manifest.json").is_file():
        return None
    try:
        listed = json.loads((root / "manifest.json").read_text()).get("sources", [])
    except (OSError, ValueError):
        return None
    if len(listed) != n:
        return None
    return [int(s["tokens"]) for s in listed]


def _bytes_estimate(uri: str | None, base_dir: Path) -> int | None:
    path = _local(uri, base_dir)
    if path is None or not path.exists():
        return None
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return int(sum(p.stat().st_size for p in files) / BYTES_PER_TOKEN)


def plan_mixture(
    spec: ContinualPretrainSpec, total_tokens: int, base_dir: Path
) -> list[SourcePlan]:
    """Every source's share, tokens and epochs for a run of ``total_tokens``."""
    sources = spec.data.sources
    exact = _manifest_sizes(spec.data_uri(), base_dir, len(sources))
    sizes: list[int | None] = (
        list(exact) if exact else [_bytes_estimate(s.uri, base_dir) for s in sources]
    )
    weights = [s.weight for s in sources]
    if all(w is not None for w in weights):
        q = quotas([float(w or 0.0) for w in weights])
        shares: list[float | None] = [x / WINDOW for x in q]
    elif all(n is not None for n in sizes) and sum(n or 0 for n in sizes) > 0:
        total = sum(n or 0 for n in sizes)
        shares = [(n or 0) / total for n in sizes]
    else:
        shares = [None] * len(sources)
    out = []
    for i, (src, share, size) in enumerate(zip(sources, shares, sizes, strict=True)):
        tokens = None if share is None else round(share * total_tokens)
        epochs = None if tokens is None or not size else tokens / size
        out.append(
            SourcePlan(
                i, source_name(i, src), src.weight, share, size, exact is not None, tokens, epochs
            )
        )
    return out


def mixture_warnings(rows: list[SourcePlan]) -> list[tuple[str, str]]:
    """(field path, message) for every source the run repeats or leaves out of training."""
    out = []
    for r in rows:
        path = f"spec.data.sources[{r.index}]"
        if r.weight == 0:
            out.append((path, f"{r.name} has weight 0: evaluation only, not trained on"))
        elif r.epochs is not None and r.epochs > 1:
            how = "" if r.exact else " (size estimated from file bytes)"
            out.append(
                (
                    path,
                    f"{r.name} is smaller than its share: about {r.epochs:.1f} epochs over its "
                    f"tokens{how}; each repeat adds less than new data",
                )
            )
    return out


def eval_warnings(spec: ContinualPretrainSpec, max_steps: int) -> list[tuple[str, str]]:
    """(field path, message) where ``evalEverySteps`` cannot do what it is asked."""
    every = spec.training.eval_every_steps
    if every is None:
        return []
    path = "spec.training.evalEverySteps"
    if spec.data.held_out_fraction <= 0:
        return [(path, "no held-out data (data.heldOutFraction is 0): nothing to evaluate")]
    if max_steps and every > max_steps:
        return [(path, f"{every} > the run's {max_steps} steps: evaluated at the last step only")]
    return []


def _tokens(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.3g} B" if n >= 10**8 else f"{n:,}"


def render_rows(rows: list[SourcePlan]) -> list[tuple[str, str]]:
    """The ``data`` rows of ``cpt plan`` (none for one unweighted source: nothing to say)."""
    if len(rows) == 1 and rows[0].weight is None:
        return []
    out = []
    for r in rows:
        share = "by size" if r.share is None else f"{100 * r.share:.1f}%"
        weight = "" if r.weight is None else f"weight {r.weight:g}, "
        if r.size_tokens is None:
            of = "tokens (source size unknown until tokenized)"
        else:
            est = "" if r.exact else " est."
            epochs = "?" if r.epochs is None else f"{r.epochs:.2f}"
            of = f"of {_tokens(r.size_tokens)}{est} tokens ({epochs} epochs)"
        out.append((f"  {r.name}", f"{weight}{share}: {_tokens(r.tokens)} {of}"))
    return [("data mixture", f"{len(rows)} sources"), *out]
