"""``cpt plot``: a run's curves across attempts, from the TensorBoard files the trainer writes.

Each training attempt writes its own ``<tensorboard>/attempt-<n>/`` folder (local or
``s3://``), so a run that failed and resumed has its loss curve in pieces. This module reads
every attempt's event files through the project's storage layer and puts them on one set of
axes: loss, learning rate, tokens/s and the held-out loss per source (when the run evaluates),
each attempt in its own colour, with a dashed marker at the step each attempt started from
(its resume step; 0 for the first). ``render_png`` writes the picture, ``render_text`` draws
the loss in a terminal, and ``Curves.to_json`` is the same data as numbers (what the picture
shows, for scripts and tests).

The resume step is the ``attempt/start_step`` scalar the trainer writes when an attempt
starts; event files of older trainers lack it, and then the step before the attempt's first
logged step stands in (the trainer always logs the first step it runs).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpt_training import storage

START_TAG = "attempt/start_step"
PANELS: tuple[tuple[str, str], ...] = (
    ("train/loss", "training loss"),
    ("train/lr", "learning rate"),
    ("perf/tokens_per_sec", "tokens/s"),
)
"""The fixed panels: (TensorBoard tag, axis title). Held-out loss adds one panel per run."""
EVAL_TAG = re.compile(r"^eval/(?P<source>.+)/loss$")
_ATTEMPT_DIR = re.compile(r"^attempt-(\d+)$")

Series = list[tuple[int, float]]


class PlotError(RuntimeError):
    """Nothing to plot: the message says where cpt looked."""


@dataclass
class Attempt:
    number: int
    resume_step: int
    series: dict[str, Series] = field(default_factory=dict)


@dataclass
class Curves:
    """One run's scalars, by attempt (ascending)."""

    source: str
    attempts: list[Attempt]

    def eval_sources(self) -> list[str]:
        names = {
            m.group("source")
            for a in self.attempts
            for tag in a.series
            if (m := EVAL_TAG.match(tag)) is not None
        }
        return sorted(names)

    def panels(self) -> list[tuple[str, str]]:
        """(tag, title) of each panel with data; held-out loss of every source shares one."""
        have = {tag for a in self.attempts for tag in a.series}
        out = [(tag, title) for tag, title in PANELS if tag in have]
        if self.eval_sources():
            out.append(("eval/*/loss", "held-out loss per source"))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "panels": [tag for tag, _ in self.panels()],
            "attempts": [
                {
                    "attempt": a.number,
                    "resumeStep": a.resume_step,
                    "series": {tag: [[s, v] for s, v in pts] for tag, pts in a.series.items()},
                }
                for a in self.attempts
            ],
        }


# -- reading -----------------------------------------------------------------------------------


def _scalars(event_file: Path) -> dict[str, Series]:
    """Every scalar in one event file, by tag, in file order."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.util import tensor_util

    out: dict[str, Series] = {}
    for event in LegacyEventFileLoader(str(event_file)).Load():
        if not event.HasField("summary"):
            continue
        for value in event.summary.value:
            if value.HasField("simple_value"):
                number = float(value.simple_value)
            elif value.HasField("tensor"):
                number = float(tensor_util.make_ndarray(value.tensor).item())
            else:
                continue
            out.setdefault(value.tag, []).append((int(event.step), number))
    return out


def _attempt(number: int, files: list[Path]) -> Attempt:
    merged: dict[str, dict[int, float]] = {}
    for f in sorted(files):
        for tag, points in _scalars(f).items():
            merged.setdefault(tag, {}).update(points)  # a later file wins for a repeated step
    series = {tag: sorted(points.items()) for tag, points in merged.items()}
    start = series.pop(START_TAG, [])
    if start:
        resume = int(start[-1][1])
    else:
        firsts = [pts[0][0] for tag, pts in series.items() if pts and not tag.startswith("eval/")]
        resume = max(0, min(firsts) - 1) if firsts else 0
    return Attempt(number=number, resume_step=resume, series=series)


def tensorboard_root(uri: str) -> storage.Storage:
    """The folder holding ``attempt-<n>/``: ``uri`` itself, or its ``tensorboard/`` child (so
    a run's checkpoint root works too)."""
    root = storage.open_storage(uri)
    dirs = [d.rstrip("/") for d in root.list_dirs()]
    if not any(_ATTEMPT_DIR.match(d) for d in dirs) and "tensorboard" in dirs:
        return root.child("tensorboard")
    return root


def read_curves(uri: str) -> Curves:
    """Every attempt's scalars under ``uri`` (a local folder or ``s3://``). S3 objects are
    downloaded to a temporary folder first: the TensorBoard reader takes file paths."""
    root = tensorboard_root(uri)
    numbered = sorted(
        (int(m.group(1)), d.rstrip("/"))
        for d in root.list_dirs()
        if (m := _ATTEMPT_DIR.match(d.rstrip("/")))
    )
    attempts: list[Attempt] = []
    with tempfile.TemporaryDirectory(prefix="cpt-plot-") as tmp:
        for number, name in numbered:
            folder = root.child(name)
            keys = [k for k in folder.list() if "tfevents" in k.rsplit("/", 1)[-1]]
            files = []
            for key in keys:
                local = folder.local_path(key)
                if local is None:
                    local = Path(tmp) / name / key.replace("/", "_")
                    folder.download_file(key, local)
                files.append(local)
            if files:
                attempts.append(_attempt(number, files))
    if not attempts:
        raise PlotError(f"no TensorBoard event files under {root} (attempt-<n>/events.out.*)")
    return Curves(source=str(uri), attempts=attempts)


def resolve_source(run: str, namespace: str | None) -> tuple[str, str]:
    """(TensorBoard URI, a name for titles and files) for ``cpt plot RUN``: RUN is a URI or a
    local folder, or else the name of a ContinualPretrain whose ``status.tensorboardUri`` says
    where its files are (read through the kubeconfig, ``KUBECONFIG``)."""
    if "://" in run or Path(run).exists():
        return run, Path(run.rstrip("/")).name or "run"
    from cpt_operator.doctor import KubeReader
    from cpt_operator.kube import Kube, api_client

    try:
        ns = namespace or KubeReader().default_namespace
        kube = Kube(api_client(pool_size=2))
        try:
            obj = kube.get_run(ns, run)
        finally:
            kube.close()
    except Exception as err:  # no kubeconfig, no access: say so, not a traceback
        raise PlotError(f"cannot read ContinualPretrain {run!r} from the cluster: {err}") from err
    if obj is None:
        raise PlotError(f"no ContinualPretrain {ns}/{run}, and no folder named {run!r} here")
    uri = (obj.get("status") or {}).get("tensorboardUri")
    if not uri:
        raise PlotError(f"{ns}/{run} has no status.tensorboardUri yet (it has not trained)")
    return str(uri), run


# -- drawing -----------------------------------------------------------------------------------


def _panel_series(attempt: Attempt, tag: str) -> dict[str, Series]:
    if tag != "eval/*/loss":
        return {tag: attempt.series[tag]} if tag in attempt.series else {}
    return {t: pts for t, pts in attempt.series.items() if EVAL_TAG.match(t)}


def render_png(curves: Curves, path: Path, title: str = "") -> Any:
    """Write the picture; returns the matplotlib Figure (its artists are what the PNG shows)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    panels = curves.panels()
    fig = Figure(figsize=(10, 2.6 * len(panels) + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    colours = [f"C{i % 10}" for i in range(len(curves.attempts))]
    sources = curves.eval_sources()
    for ax, (tag, label) in zip(axes, panels, strict=True):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for attempt, colour in zip(curves.attempts, colours, strict=True):
            for series_tag, pts in _panel_series(attempt, tag).items():
                name = f"attempt {attempt.number}"
                if tag == "eval/*/loss":
                    source = EVAL_TAG.match(series_tag)
                    label_ = source.group("source") if source else series_tag
                    name += f" {label_}"
                    shape = "os^vD*"[sources.index(label_) % 6] if label_ in sources else "o"
                    style = {"marker": shape, "markersize": 4}
                else:
                    style = {}
                ax.plot([s for s, _ in pts], [v for _, v in pts], color=colour, label=name, **style)
            ax.axvline(attempt.resume_step, color=colour, linestyle="--", linewidth=1.2)
        if tag == "eval/*/loss":
            ax.legend(loc="upper right", fontsize=8)
        if tag == "train/lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for i, (attempt, colour) in enumerate(zip(curves.attempts, colours, strict=True)):
        axes[0].annotate(  # one line lower per attempt: close resume steps stay readable
            f"attempt {attempt.number} from step {attempt.resume_step}",
            xy=(attempt.resume_step, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12 - 11 * (i % 4)),
            textcoords="offset points",
            color=colour,
            fontsize=8,
        )
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("step")
    fig.suptitle(title or curves.source)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return fig


def render_text(curves: Curves, width: int = 72, height: int = 16) -> str:
    """The loss across attempts as characters: each attempt's points are its number (the last
    attempt drawn wins a shared cell), ``|`` marks where an attempt started."""
    points = [(a.number, s, v) for a in curves.attempts for s, v in a.series.get("train/loss", [])]
    if not points:
        raise PlotError(f"no train/loss scalars in {curves.source}")
    starts = [a.resume_step for a in curves.attempts]
    x_lo = min([s for _, s, _ in points] + starts)
    x_hi = max(s for _, s, _ in points)
    y_lo, y_hi = min(v for *_, v in points), max(v for *_, v in points)
    grid = [[" "] * width for _ in range(height)]

    def col(step: int) -> int:
        return round((step - x_lo) / max(1, x_hi - x_lo) * (width - 1))

    for step in starts:
        for row in grid:
            row[col(step)] = "|"
    for number, step, value in points:
        y = round((y_hi - value) / ((y_hi - y_lo) or 1.0) * (height - 1))
        grid[y][col(step)] = str(number % 10)
    lines = [f"loss  {curves.source}"]
    for i, row in enumerate(grid):
        edge = f"{y_hi:9.4f} " if i == 0 else f"{y_lo:9.4f} " if i == height - 1 else " " * 10
        lines.append(edge + "".join(row).rstrip())
    lines.append(" " * 10 + f"{x_lo:<{width // 2}}{x_hi:>{width - width // 2}}  (step)")
    for a in curves.attempts:
        lines.append(f"  attempt {a.number}: started at step {a.resume_step}")
    return "\n".join(lines) + "\n"


__all__ = ["Curves", "PlotError", "read_curves", "render_png", "render_text"]
