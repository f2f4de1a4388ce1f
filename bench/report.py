"""Regenerate the tables of docs/PERFORMANCE.md from bench/results/*.json.

The document holds hand-written analysis plus generated blocks between markers::

    <!-- bench:goals:begin --> ... <!-- bench:goals:end -->      every measurement with a goal
    <!-- bench:<section>:begin --> ... <!-- bench:<section>:end -->  one table per section

A section is the first dot-separated part of a measurement name (``tokenize``, ``train``,
``scaling``, ``ckpt``, ``operator``, ``planner``). ``--check`` exits 1 when the document is
stale (for CI); nothing here runs a benchmark.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

DOC = common.REPO / "docs" / "PERFORMANCE.md"
_BLOCK = re.compile(
    r"(<!-- bench:(?P<name>[a-z0-9_-]+):begin -->\n)(?P<body>.*?)(<!-- bench:(?P=name):end -->)",
    re.S,
)


def fmt(x: Any, metric: str = "") -> str:
    """A number for a table: fractions of MFU/error as percent, big counts with separators."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if not isinstance(x, (int, float)):
        return str(x)
    v = float(x)
    if not math.isfinite(v):
        return "-"
    if metric in ("MFU", "|relative error|", "share"):
        return f"{100 * v:.1f}%"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.2f} M"
    if a >= 1e4:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.2f}"
    if a == 0:
        return "0"
    return f"{v:.3g}"


def fmt_goal(m: dict[str, Any]) -> str:
    g = m.get("goal")
    if not g:
        return ""
    target = fmt(g["target"], m["metric"] if g.get("on") != "ratio" else "")
    what = "ratio" if g.get("on") == "ratio" else m["metric"]
    return f"{what} {g['op']} {target}"


def status(m: dict[str, Any]) -> str:
    met = common.goal_met(m)
    if met is None:
        return ""
    return "met" if met else "**missed**"


def fmt_config(cfg: dict[str, Any], limit: int = 6) -> str:
    parts = []
    for k, v in cfg.items():
        if isinstance(v, (dict, list)):
            continue
        parts.append(f"{k}={v}")
    shown = parts[:limit]
    more = len(parts) - len(shown)
    return ", ".join(shown) + (f", +{more} more" if more > 0 else "")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def section_table(items: list[dict[str, Any]]) -> str:
    head = [
        "measurement",
        "value",
        "metric",
        "baseline",
        "ratio",
        "goal",
        "status",
        "machine",
        "date",
    ]
    lines = [_row(head), _row(["---"] * len(head))]
    for m in items:
        base = ""
        if "baselineName" in m:
            base = f"{fmt(m['baselineValue'], m['metric'])} ({m['baselineName']})"
        ratio = m.get("ratio")
        lines.append(
            _row(
                [
                    f"`{m['name']}`",
                    fmt(m["value"], m["metric"]),
                    m["metric"],
                    base,
                    "" if ratio is None else f"{ratio:.2f}x",
                    fmt_goal(m),
                    status(m),
                    m["machine"],
                    m["date"][:10],
                ]
            )
        )
    return "\n".join(lines) + "\n"


def goals_table(items: list[dict[str, Any]]) -> str:
    head = ["measurement", "goal", "measured", "status", "results file"]
    lines = [_row(head), _row(["---"] * len(head))]
    for m in items:
        if not m.get("goal"):
            continue
        g = m["goal"]
        measured = (
            f"{m['ratio']:.2f}x"
            if g.get("on") == "ratio" and m.get("ratio") is not None
            else fmt(m["value"], m["metric"]) + ("" if m["metric"] == "MFU" else f" {m['metric']}")
        )
        lines.append(
            _row([f"`{m['name']}`", fmt_goal(m), measured, status(m), m.get("source", "")])
        )
    return "\n".join(lines) + "\n"


def config_table(items: list[dict[str, Any]]) -> str:
    """Per measurement, its full configuration (scalars), for the appendix."""
    lines = [_row(["measurement", "configuration"]), _row(["---", "---"])]
    for m in items:
        lines.append(_row([f"`{m['name']}`", fmt_config(m["config"], limit=40)]))
    return "\n".join(lines) + "\n"


def _find(items: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for m in items:
        if m["name"] == name:
            return m
    return None


def breakdown_table(items: list[dict[str, Any]]) -> str | None:
    """Step-time phases and GPU time per kernel category of the native trainer."""
    m = _find(items, "train.native.step_time")
    if m is None:
        return None
    d = m.get("details") or {}
    step = float(m["value"])
    lines = [_row(["phase (CUDA events)", "ms/step", "share"]), _row(["---"] * 3)]
    for key, label in (
        ("forwardMs", "forward (4 micro-batches)"),
        ("backwardMs", "backward"),
        ("forwardBackwardMs", "forward + backward (all micro batches)"),
        ("optimizerMs", "grad clip + AdamW step + zero_grad"),
        ("otherMs", "other (host, copies between phases)"),
    ):
        if key in d:
            lines.append(_row([label, f"{d[key]:.1f}", fmt(d[key] / step, "share")]))
    lines.append(_row(["**step**", f"{step:.1f}", "100%"]))
    prof = d.get("profile") or {}
    cfg = m.get("config") or {}
    kt = prof.get("kernelTable")
    mm = ((kt or {}).get("rows") or {}).get("matmul") or (prof.get("categories") or {}).get(
        "matmul"
    )
    if mm and all(k in cfg for k in ("params", "seqLen", "microBatch", "gradAccum")):
        tokens = cfg["seqLen"] * cfg["microBatch"] * cfg["gradAccum"]
        tflops = 6 * cfg["params"] * tokens / (mm["msPerStep"] / 1000) / 1e12
        lines.append(
            _row([f"matmul rate: 6·N·tokens per step / matmul time = {tflops:.0f} TFLOP/s", "", ""])
        )
    if kt and kt.get("rows"):
        lines += [
            "",
            _row(["GPU time by kernel category (overlaps counted once)", "ms/step", "share"]),
            _row(["---"] * 3),
        ]
        for cat, v in sorted(kt["rows"].items(), key=lambda kv: -kv[1]["msPerStep"]):
            lines.append(_row([cat, f"{v['msPerStep']:.1f}", fmt(v["share"], "share")]))
        lines.append(_row(["**profiled window**", f"{kt['windowMsPerStep']:.1f}", "100%"]))
    elif prof.get("categories"):
        lines += [
            "",
            _row(["GPU time by kernel (torch.profiler)", "ms/step", "share"]),
            _row(["---"] * 3),
        ]
        cats = sorted(prof["categories"].items(), key=lambda kv: -kv[1]["msPerStep"])
        for cat, v in cats:
            lines.append(_row([cat, f"{v['msPerStep']:.1f}", fmt(v["share"], "share")]))
    if prof.get("topKernels"):
        lines += ["", _row(["top kernels", "ms/step", "calls/step"]), _row(["---"] * 3)]
        for k in prof["topKernels"][:8]:
            lines.append(
                _row([f"`{k['name'][:70]}`", f"{k['msPerStep']:.1f}", f"{k['callsPerStep']:.0f}"])
            )
    lines.append("")
    lines.append(
        f"Compile + first steps (warm-up, excluded): {fmt(d.get('warmupSeconds'))} s. "
        f"Source: `{m.get('source', '')}`."
    )
    return "\n".join(lines) + "\n"


def stalls_table(items: list[dict[str, Any]]) -> str | None:
    rows = [m for m in items if m["name"].startswith("ckpt.stall.")]
    if not rows:
        return None
    head = [
        "save",
        "staging",
        "stall (s)",
        "save call (s)",
        "waited for previous write (s)",
        "lost until next save (s)",
        "background write (s)",
        "write ok",
        "machine",
    ]
    lines = [_row(head), _row(["---"] * len(head))]
    for m in rows:
        d = m.get("details") or {}
        lines.append(
            _row(
                [
                    f"`{m['name']}` (step {m['config'].get('checkpointStep')})",
                    str(d.get("staging", "")),
                    fmt(m["value"]),
                    fmt(d.get("saveCallSeconds")),
                    fmt(d.get("waitPreviousWriteSeconds")),
                    fmt(d.get("lostUntilNextSaveSeconds")),
                    fmt(d.get("backgroundWriteSeconds")),
                    fmt(d.get("writeSucceeded")),
                    m["machine"],
                ]
            )
        )
    return "\n".join(lines) + "\n"


def runs_table(items: list[dict[str, Any]], prefix: str) -> str | None:
    """Every repeat of the tokenization / transfer variants, with the machine's load."""
    rows = [m for m in items if m["name"].startswith(prefix)]
    if not rows:
        return None
    head = [
        "measurement",
        "variant",
        "repeat",
        "value",
        "wall (s)",
        "CPU (s)",
        "per CPU-s",
        "load average before / after",
    ]
    lines = [_row(head), _row(["---"] * len(head))]
    for m in rows:
        d = m.get("details") or {}
        variants: list[tuple[str, list[dict[str, Any]]]] = []
        if "runs" in d:
            variants.append(("ours", d["runs"]))
        for key, sub in d.items():
            if key == "runs":
                continue
            if isinstance(sub, dict) and isinstance(sub.get("runs"), list):
                variants.append((key, sub["runs"]))
            elif isinstance(sub, list) and sub and isinstance(sub[0], dict) and "seconds" in sub[0]:
                variants.append((key, sub))
        for label, runs in variants:
            for i, r in enumerate(runs, start=1):
                rate = r.get("tokensPerSec") or r.get("MBps")
                per_cpu = r.get("tokensPerCpuSec") or r.get("MBperCpuSecond")
                cpu = r.get("cpuSeconds", r.get("clientCpuSeconds"))
                lines.append(
                    _row(
                        [
                            f"`{m['name']}`",
                            label,
                            str(i),
                            fmt(rate),
                            fmt(r.get("seconds")),
                            fmt(cpu),
                            fmt(per_cpu),
                            f"{r.get('loadAvgBefore', '')} / {r.get('loadAvg', '')}",
                        ]
                    )
                )
    return "\n".join(lines) + "\n"


def render_blocks(items: list[dict[str, Any]]) -> dict[str, str]:
    """Block name -> generated markdown (pure; unit-tested)."""
    sections: dict[str, list[dict[str, Any]]] = {}
    for m in items:
        parts = m["name"].split(".")
        sections.setdefault(parts[0], []).append(m)
        if len(parts) > 2:  # e.g. "ckpt-sync", "ckpt-stall": a sub-section of its own
            sections.setdefault(f"{parts[0]}-{parts[1]}", []).append(m)
    blocks = {name: section_table(ms) for name, ms in sections.items()}
    blocks["goals"] = goals_table(items)
    blocks["configs"] = config_table(items)
    for name, body in (
        ("breakdown", breakdown_table(items)),
        ("stalls", stalls_table(items)),
        ("tokenize-runs", runs_table(items, "tokenize.")),
        ("ckpt-runs", runs_table(items, "ckpt.sync.")),
    ):
        if body is not None:
            blocks[name] = body
    return blocks


def apply_blocks(doc: str, blocks: dict[str, str]) -> str:
    """Replace the body of every marker pair whose name has a block; others are left alone
    (a section without results keeps a note saying so)."""

    def sub(m: re.Match[str]) -> str:
        name = m["name"]
        body = blocks.get(name)
        if body is None:
            body = "_No results yet: run the benchmark (see above)._\n"
        return f"{m.group(1)}{body}{m.group(4)}"

    return _BLOCK.sub(sub, doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(common.RESULTS))
    p.add_argument("--doc", default=str(DOC))
    p.add_argument("--check", action="store_true", help="exit 1 if the document is stale")
    args = p.parse_args(argv)
    items = common.load_results(Path(args.results).glob("*.json"))
    doc_path = Path(args.doc)
    doc = doc_path.read_text()
    new = apply_blocks(doc, render_blocks(items))
    if args.check:
        if new != doc:
            print(f"{doc_path} is stale: run `python bench/report.py`", file=sys.stderr)
            return 1
        return 0
    if new != doc:
        doc_path.write_text(new)
        print(f"updated {doc_path} from {len(items)} measurements")
    else:
        print(f"{doc_path} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
