"""Shared pieces of the benchmarks: paths, the measurement record, machine description.

A measurement is one JSON object (``bench/results/<stem>.json`` holds a list of them)::

    {"name": "tokenize.ours.1core", "machine": "...", "config": {...},
     "metric": "tokens/s", "value": 1.2e6,
     "baselineName": "seed datasets.map", "baselineValue": 3.1e5, "ratio": 3.9,
     "goal": {"op": ">=", "target": 3.0, "on": "ratio"}, "date": "2026-11-22T04:10:00+00:00",
     "details": {...}}

``ratio`` is always ``value / baselineValue``; metrics are oriented so that the ratio reads as
"how many times better" (throughputs, not times). Nothing here knows about any one benchmark;
``report.py`` renders whatever the results hold.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = REPO / "bench" / "work"
"""Scratch space (corpora, tokenizers, outputs); ignored by git."""

REQUIRED_KEYS = ("name", "machine", "config", "metric", "value", "date")


def bootstrap() -> None:
    """Make ``bench``, ``cpt_training`` and ``cpt_operator`` importable from a plain checkout
    (the GPU machine has no editable install, only the working tree)."""
    for p in (REPO, REPO / "training", REPO / "operator"):
        s = str(p)
        if s not in sys.path:
            sys.path.insert(0, s)


def goal(
    op: Literal[">=", "<="], target: float, on: Literal["value", "ratio"] = "value"
) -> dict[str, Any]:
    return {"op": op, "target": target, "on": on}


def goal_met(m: dict[str, Any]) -> bool | None:
    """Whether a measurement meets its goal; None when it has none or lacks the number."""
    g = m.get("goal")
    if not g:
        return None
    x = m.get("ratio") if g.get("on") == "ratio" else m.get("value")
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    if g["op"] == ">=":
        return bool(x >= g["target"])
    if g["op"] == "<=":
        return bool(x <= g["target"])
    raise ValueError(f"goal op must be '>=' or '<=', got {g['op']!r}")


def measurement(
    name: str,
    machine: str,
    config: dict[str, Any],
    metric: str,
    value: float,
    *,
    baseline: tuple[str, float] | None = None,
    goal: dict[str, Any] | None = None,
    details: dict[str, Any] | None = None,
    date: str | None = None,
) -> dict[str, Any]:
    """One measurement object; the ratio is computed here so no script gets it backwards."""
    m: dict[str, Any] = {
        "name": name,
        "machine": machine,
        "config": config,
        "metric": metric,
        "value": float(value),
        "date": date or datetime.now(UTC).replace(microsecond=0).isoformat(),
    }
    if baseline is not None:
        bname, bval = baseline
        m["baselineName"] = bname
        m["baselineValue"] = float(bval)
        m["ratio"] = float(value) / float(bval) if bval else None
    if goal is not None:
        m["goal"] = goal
    if details:
        m["details"] = details
    return m


def validate(m: dict[str, Any], where: str = "") -> None:
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise ValueError(f"{where}: measurement lacks {', '.join(missing)}")
    if "baselineName" in m and "baselineValue" not in m:
        raise ValueError(f"{where}: {m['name']} names a baseline without its value")


def write_results(stem: str, items: Sequence[dict[str, Any]], out_dir: Path | None = None) -> Path:
    """Write (replace) ``<out_dir>/<stem>.json``: the newest run of a benchmark wins."""
    out = (out_dir or RESULTS) / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for m in items:
        validate(m, str(out))
    out.write_text(json.dumps(list(items), indent=1, sort_keys=True) + "\n")
    return out


def load_results(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every measurement of the given result files, validated, in file then list order."""
    out: list[dict[str, Any]] = []
    for p in sorted(paths):
        data = json.loads(p.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{p}: a results file holds a JSON list of measurements")
        for m in data:
            validate(m, str(p))
            m.setdefault("source", p.name)
            out.append(m)
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_machine() -> str:
    return f"host CPU: {cpu_model()}, {usable_cores()} cores"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def cv(xs: Sequence[float]) -> float | None:
    """Coefficient of variation (stdev / mean), None for fewer than two samples."""
    if len(xs) < 2:
        return None
    mean = statistics.fmean(xs)
    return float(statistics.stdev(xs) / mean) if mean else None


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not xs:
        raise ValueError("percentile of no samples")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi:
        return float(s[lo])
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))
