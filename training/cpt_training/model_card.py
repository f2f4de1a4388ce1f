"""The model card (``README.md``) of an exported model, in the Hugging Face Hub's form: YAML
front matter (base_model, datasets, license, tags) and a body that says how the model was made
and what it learned and forgot, per data source.

Why written by the export stage: it is the one place that has the run's configuration, the
final step and the before/after evaluation together, and the card travels with the weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from cpt_training import __version__
from cpt_training.config import ExportHfStage, source_name
from cpt_training.schedule import LrSchedule

TAGS = ["cpt", "continual-pretraining", "llama", "text-generation"]


def base_license(base_dir: Path) -> str | None:
    """The ``license`` of the base model's own card, when it has one."""
    readme = base_dir / "README.md"
    if not readme.is_file():
        return None
    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.read_text(errors="replace"), re.S)
    if not m:
        return None
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def _hf_repo(uri: str) -> tuple[str | None, str | None]:
    """(repo id, revision) of an ``hf://org/name[@rev]`` URI; (None, None) otherwise."""
    if not uri.startswith("hf://"):
        return None, None
    repo, _, rev = uri.removeprefix("hf://").partition("@")
    return repo, rev or None


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _front_matter(cfg: ExportHfStage, license_: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"library_name": "transformers", "tags": list(TAGS)}
    repo, _ = _hf_repo(cfg.model_uri)
    if repo:
        meta["base_model"] = repo
    datasets = sorted({s.hf_dataset for s in cfg.sources if s.hf_dataset})
    if datasets:
        meta["datasets"] = datasets
    if license_:
        meta["license"] = license_
    return meta


def _mixture_lines(cfg: ExportHfStage, tokens_seen: dict[str, int] | None) -> list[str]:
    if not cfg.sources:
        return []
    lines = ["## Data", "", "| source | data | weight | tokens seen |", "|---|---|---:|---:|"]
    weights = {m.name: m.weight for m in cfg.mixture or []}
    for i, src in enumerate(cfg.sources):
        name = source_name(i, src)
        where = src.hf_dataset or src.uri or ""
        weight = f"{weights[name]:g}" if name in weights else "by size"
        seen = "n/a" if tokens_seen is None else f"{tokens_seen.get(name, 0):,}"
        lines.append(f"| {name} | `{where}` | {weight} | {seen} |")
    return [*lines, ""]


def _training_lines(cfg: ExportHfStage, step: int) -> list[str]:
    lines = ["## Training", ""]
    if cfg.global_batch_size and cfg.seq_len:
        tokens = step * cfg.global_batch_size * cfg.seq_len
        lines.append(
            f"- steps: {step:,} x {cfg.global_batch_size} blocks of {cfg.seq_len} tokens "
            f"= {tokens:,} tokens"
        )
    else:
        lines.append(f"- steps: {step:,}")
    if cfg.instance_type:
        lines.append(f"- hardware: {cfg.nodes or 1} x {cfg.instance_type}")
    lines.append(
        f"- parallelism: tensor {cfg.tensor_parallel} x pipeline {cfg.pipeline_parallel}, "
        f"backend {cfg.backend}"
    )
    opt = cfg.optimizer
    if opt is not None:
        sched = (
            f"{opt.decay_style}, lr {opt.lr:g} -> minLr {opt.min_lr:g}, warmup {opt.warmup_steps}"
        )
        if opt.warmup_start_lr:
            sched += f" from {opt.warmup_start_lr:g} (re-warmed)"
        if opt.decay_style == "wsd":
            hold = LrSchedule.from_config(opt, max(step, 1)).hold_steps
            sched += f", plateau {hold} steps, cooldown {opt.cooldown_fraction:g} of the run"
        lines.append(f"- learning rate: {sched}")
    return [*lines, ""]


def _eval_lines(comparison: dict[str, Any] | None) -> list[str]:
    if not comparison:
        return []
    lines = [
        "## Evaluation: held-out loss per source, base model -> this model",
        "",
        "| source | blocks | loss before | loss after | change | perplexity before "
        "| perplexity after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [*comparison["sources"].items(), ("total", comparison["totals"])]
    for name, e in rows:
        change = e.get("lossChange")
        lines.append(
            f"| {name} | {e['blocks']} | {_fmt(e['before']['loss'])} | "
            f"{_fmt(e['after']['loss'])} | {'n/a' if change is None else f'{change:+.4f}'} | "
            f"{_fmt(e['before']['perplexity'], 2)} | {_fmt(e['after']['perplexity'], 2)} |"
        )
    lines += [
        "",
        "A negative change is adaptation (the model got better on that source); a positive "
        "change on a source of the original distribution (replay) is forgetting.",
        "",
    ]
    return lines


def render(
    cfg: ExportHfStage,
    *,
    step: int,
    comparison: dict[str, Any] | None,
    tokens_seen: dict[str, int] | None,
    license_: str | None,
) -> str:
    """The card's text: front matter, then the body."""
    repo, rev = _hf_repo(cfg.model_uri)
    base = f"`{repo}`" + (f" at revision `{rev}`" if rev else "") if repo else f"`{cfg.model_uri}`"
    body = [
        f"# {cfg.run_name}",
        "",
        f"Continually pretrained from {base} with cpt {__version__} "
        "(ContinualPretrain, cpt.dev/v1alpha1).",
        "",
        *_mixture_lines(cfg, tokens_seen),
        *_training_lines(cfg, step),
        *_eval_lines(comparison),
    ]
    meta = yaml.safe_dump(_front_matter(cfg, license_), sort_keys=True).strip()
    return f"---\n{meta}\n---\n\n" + "\n".join(body).rstrip() + "\n"
