"""Goal 6: calibration error of the planner's throughput model on held-out rows.

Two kinds of held-out rows:

* leave-one-out over the published anchors (``calibration_report()``: the model is refitted
  without each row and predicts it), per device group; the goal is on trn1 (NxD).
* our own GPU measurements (``bench/results/train-*.json`` / ``scaling-*.json``, written by the
  GPU benchmarks): rows the model never saw. Each is predicted with the full fit.
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

GOAL = 0.15


def loo_measurements(report: list[dict[str, Any]], machine: str) -> list[dict[str, Any]]:
    """Per group with held-out rows: max and mean |LOO error| (pure; unit-tested)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in report:
        if r.get("loo_error") is not None:
            groups.setdefault(r["group"], []).append(r)
    out = []
    for group, rows in sorted(groups.items()):
        errs = [abs(float(r["loo_error"])) for r in rows]
        worst = max(rows, key=lambda r: abs(float(r["loo_error"])))
        per_row = {
            r["id"]: {
                "measuredMfu": r["measured_mfu"],
                "looMfu": r["loo_mfu"],
                "looError": r["loo_error"],
            }
            for r in rows
        }
        key = group.replace("/", "_")
        out.append(
            common.measurement(
                f"planner.loo.{key}.max",
                machine,
                {"group": group, "heldOutRows": len(rows), "method": "leave-one-out refit"},
                "|relative error|",
                max(errs),
                goal=common.goal("<=", GOAL) if group.startswith("nxd/") else None,
                details={"worstRow": worst["id"], "rows": per_row},
            )
        )
        out.append(
            common.measurement(
                f"planner.loo.{key}.mean",
                machine,
                {"group": group, "heldOutRows": len(rows), "method": "leave-one-out refit"},
                "|relative error|",
                sum(errs) / len(errs),
            )
        )
    return out


def own_rows(results_dir: Path) -> list[dict[str, Any]]:
    """Our GPU training measurements that carry what the planner needs to predict them."""
    rows = []
    for p in sorted(results_dir.glob("*.json")):
        if not p.name.startswith(("train-", "scaling-")):
            continue
        for m in json.loads(p.read_text()):
            pin = (m.get("details") or {}).get("plannerInput")
            if pin and m.get("metric") == "MFU":
                rows.append({"name": m["name"], "machine": m["machine"], "mfu": m["value"], **pin})
    return rows


def own_row_measurements(machine: str, results_dir: Path) -> list[dict[str, Any]]:
    common.bootstrap()
    from cpt_operator.api import planner

    model = planner.efficiency_model()
    out = []
    for r in own_rows(results_dir):
        pred = model.predict(
            r["group"], r["hidden"], r["tp"], 1, r["microbatches"], r["ac"], r["compile"]
        )
        if pred is None:
            continue
        mfu, basis = pred
        err = mfu / r["mfu"] - 1.0
        out.append(
            common.measurement(
                f"planner.own.{r['name']}",
                machine,
                {"group": r["group"], "row": r["name"], "rowMachine": r["machine"]},
                "|relative error|",
                abs(err),
                goal=common.goal("<=", GOAL),
                details={
                    "predictedMfu": mfu,
                    "measuredMfu": r["mfu"],
                    "basis": basis,
                    "signedError": err,
                },
            )
        )
    return out


def bench() -> list[dict[str, Any]]:
    common.bootstrap()
    from cpt_operator.api import planner

    machine = "planner model (pure computation)"
    items = loo_measurements(planner.calibration_report(), machine)
    items += own_row_measurements(machine, common.RESULTS)
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    items = bench()
    for m in items:
        print(f"{m['name']:50s} {m['value']:.3f}")
    if not args.no_write:
        print("wrote", common.write_results("planner", items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
