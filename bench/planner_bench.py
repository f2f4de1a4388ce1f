"""Goal 6: calibration error of the planner's throughput model on held-out rows.

Every row of ``operator/cpt_operator/api/data/calibration.yaml`` (published measurements and
this project's own GPU runs, ``measured_by: cpt``) is predicted by the model refitted without
it (leave-one-out, ``calibration_report()``), per device group; the goal applies to trn1 (NxD)
and to each of our own runs. Leave-study-out (refit without every row of the same study) is
reported beside it: our own runs share one model shape and sequence length, so their
leave-one-out error says how well the model interpolates between them, the leave-study-out
error how well it predicts a setup unlike any other row.

Our GPU results that carry ``plannerInput`` (``bench/results/train-*.json``,
``scaling-*.json``) must each be a calibration row with the same throughput; the benchmark
refuses to run otherwise, so a new GPU result cannot silently stay out of the calibration.
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
OWN = "cpt"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def loo_measurements(report: list[dict[str, Any]], machine: str) -> list[dict[str, Any]]:
    """Per group: max and mean |LOO error|, max |leave-study-out error| where some row has one,
    or a not-measurable marker for a group with a single row (pure; unit-tested)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in report:
        groups.setdefault(r["group"], []).append(r)
    out = []
    for group, all_rows in sorted(groups.items()):
        key = group.replace("/", "_")
        rows = [r for r in all_rows if r.get("loo_error") is not None]
        if not rows:
            out.append(
                common.measurement(
                    f"planner.loo.{key}.held_out_rows",
                    machine,
                    {"group": group, "rows": len(all_rows), "method": "leave-one-out refit"},
                    "rows",
                    0,
                    details={"status": "not measurable: no other row of the group to refit on"},
                )
            )
            continue
        errs = [abs(float(r["loo_error"])) for r in rows]
        worst = max(rows, key=lambda r: abs(float(r["loo_error"])))
        per_row = {
            r["id"]: {
                "measuredBy": r.get("measured_by", "published"),
                "measuredMfu": r["measured_mfu"],
                "looMfu": r["loo_mfu"],
                "looError": r["loo_error"],
                "leaveStudyOutError": r.get("lso_error"),
            }
            for r in rows
        }
        config = {"group": group, "heldOutRows": len(rows), "method": "leave-one-out refit"}
        out.append(
            common.measurement(
                f"planner.loo.{key}.max",
                machine,
                config,
                "|relative error|",
                max(errs),
                goal=common.goal("<=", GOAL) if group.startswith("nxd/") else None,
                details={"worstRow": worst["id"], "rows": per_row},
            )
        )
        out.append(
            common.measurement(
                f"planner.loo.{key}.mean", machine, config, "|relative error|", _mean(errs)
            )
        )
        lso = [abs(float(r["lso_error"])) for r in rows if r.get("lso_error") is not None]
        if lso:
            out.append(
                common.measurement(
                    f"planner.lso.{key}.max",
                    machine,
                    {"group": group, "heldOutRows": len(lso), "method": "leave-study-out refit"},
                    "|relative error|",
                    max(lso),
                )
            )
    return out


def own_row_measurements(report: list[dict[str, Any]], machine: str) -> list[dict[str, Any]]:
    """Our own GPU runs, each predicted by the model refitted without it (pure; unit-tested)."""
    out = []
    for r in report:
        if r.get("measured_by") != OWN:
            continue
        if r.get("loo_error") is None:
            raise ValueError(f"{r['id']}: no other row in {r['group']}; cannot hold it out")
        out.append(
            common.measurement(
                f"planner.own.{r['id']}",
                machine,
                {"group": r["group"], "row": r["id"], "method": "leave-one-out refit"},
                "|relative error|",
                abs(float(r["loo_error"])),
                goal=common.goal("<=", GOAL),
                details={
                    "looMfu": r["loo_mfu"],
                    "measuredMfu": r["measured_mfu"],
                    "signedError": r["loo_error"],
                    "leaveStudyOutMfu": r.get("lso_mfu"),
                    "leaveStudyOutError": r.get("lso_error"),
                },
            )
        )
    return out


def result_rows(results_dir: Path) -> list[dict[str, Any]]:
    """Our GPU training measurements that carry what the planner needs (``plannerInput``)."""
    rows = []
    for p in sorted(results_dir.glob("*.json")):
        if not p.name.startswith(("train-", "scaling-")):
            continue
        for m in json.loads(p.read_text()):
            details = m.get("details") or {}
            if details.get("plannerInput") and m.get("metric") == "MFU":
                rows.append(
                    {
                        "file": f"bench/results/{p.name}",
                        "name": m["name"],
                        "tokensPerSecPerDevice": details["tokensPerSecPerDevice"],
                    }
                )
    return rows


def unanchored(results: list[dict[str, Any]], anchor_rows: list[dict[str, Any]]) -> list[str]:
    """Results rows with no calibration row naming them (file and measurement in ``source``)
    at the same throughput (pure; unit-tested)."""
    missing = []
    for r in results:
        ok = any(
            f"{r['file']} {r['name']} " in a["source"] + " "
            and abs(a["tokens_per_sec_per_device"] - r["tokensPerSecPerDevice"]) < 1e-6
            for a in anchor_rows
        )
        if not ok:
            missing.append(f"{r['file']} {r['name']}")
    return missing


def bench() -> list[dict[str, Any]]:
    common.bootstrap()
    from cpt_operator.api import planner

    ours = [
        {"source": a.source, "tokens_per_sec_per_device": a.tokens_per_sec_per_device}
        for a in planner.anchors()
        if a.measured_by == OWN
    ]
    missing = unanchored(result_rows(common.RESULTS), ours)
    if missing:
        raise SystemExit(
            "GPU results not in operator/cpt_operator/api/data/calibration.yaml (add them as "
            "measured_by: cpt rows, source '<file> <measurement> (...)'): " + ", ".join(missing)
        )
    machine = "planner model (pure computation)"
    report = planner.calibration_report()
    return loo_measurements(report, machine) + own_row_measurements(report, machine)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    items = bench()
    for m in items:
        print(f"{m['name']:55s} {m['value']:.3f}")
    if not args.no_write:
        print("wrote", common.write_results("planner", items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
