"""Two trainer trees in one command: the trainer as it is on main (``base``) against a changed
one (``new``), same machine, shape, data and seed.

Why: a change inside the trainer (not a train-stage setting) cannot be a variant of one
``gpu_matrix.py`` run. ``bench/prepare_ab.sh`` stages both trees, ``bench/device_ab.sh`` runs
``bench/device.sh throughput`` in each with its own code on the GPU machine, and this script
joins the two results files into one: both trees' rows, the new tree's throughput as a
ratio to the base tree's, and the loss-curve check between the two trees' runs of the same
steps (``train_matrix.compare_curves``; the runs' raw results carry a loss per step).

Usage: ``python bench/ab_trees.py --prefix P --base BASE.json --new NEW.json
--base-raw RAW.json --new-raw RAW.json [--base-num RAW.json --new-num RAW.json] --stem STEM``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench import train_matrix as tm


def losses(raw: dict[str, Any]) -> list[float]:
    return [float(s["loss"]) for s in sorted(raw["steps"], key=lambda s: s["step"])]


def variant_row(items: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [m for m in items if ".native.variant." in m["name"]]
    if len(rows) != 1:
        raise ValueError(f"expected one native variant row, got {[m['name'] for m in rows]}")
    return rows[0]


def joined(
    prefix: str,
    base: list[dict[str, Any]],
    new: list[dict[str, Any]],
    curves: dict[str, tuple[dict[str, Any], dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Both trees' rows (the base tree's renamed into ``prefix.base.*``, so that one document
    section holds them all), the throughput ratio and one numerics row per pair of curves."""
    base = [{**m, "name": f"{prefix}.base.{m['name'].partition('.')[2]}"} for m in base]
    b, n = variant_row(base), variant_row(new)
    items = base + new
    items.append(
        common.measurement(
            f"{prefix}.native.new_vs_base",
            n["machine"],
            {**n["config"], "base": b["config"].get("variant")},
            "tokens/s",
            n["value"],
            baseline=(f"the trainer on main ({b['name']}, same command)", b["value"]),
            details={"base": b.get("details"), "new": n.get("details")},
        )
    )
    for label, (rb, rn) in curves.items():
        gap = tm.compare_curves(losses(rb), losses(rn))
        cfg = rn.get("config") or {}
        items.append(
            common.measurement(
                f"{prefix}.native.numerics.{label}",
                n["machine"],
                {
                    "card": n["config"].get("card"),
                    "microBatch": cfg.get("microBatchSize"),
                    "globalBatch": cfg.get("globalBatchSize"),
                    "steps": gap["steps"],
                    "compared": "base tree against new tree, same data and seed",
                },
                "max relative gap",
                gap["maxRelativeGap"],
                goal=common.goal("<=", 0.01),
                details=gap,
            )
        )
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefix", required=True)
    p.add_argument("--stem", required=True)
    for k in ("base", "new", "base-raw", "new-raw"):
        p.add_argument(f"--{k}", required=True, type=Path)
    p.add_argument("--base-num", type=Path)
    p.add_argument("--new-num", type=Path)
    p.add_argument("--results-dir", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)

    def load(path: Path) -> Any:
        return json.loads(path.read_text())

    curves = {"throughput": (load(args.base_raw), load(args.new_raw))}
    if args.base_num and args.new_num:
        curves["long"] = (load(args.base_num), load(args.new_num))
    items = joined(args.prefix, load(args.base), load(args.new), curves)
    path = common.write_results(args.stem, items, args.results_dir)
    for m in items:
        r = m.get("ratio")
        print(f"{m['name']:48s} {m['value']:12.4g} {m['metric']}" + (f" x{r:.3f}" if r else ""))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
