"""``cpt``: plan a run, check a cluster for it, write the generated CRD files, or run a spec
locally. Installed as ``kubectl-cpt`` too, so ``kubectl cpt doctor run.yaml`` works.

cpt plan run.yaml [--json] [--local]
cpt doctor run.yaml [--namespace NS]
cpt crds [--root DIR] [--check]
cpt local run.yaml [--workdir DIR] ...
cpt plot RUN [--output PNG] [--terminal] [--json]
cpt --version
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


def _cmd_plan(args: argparse.Namespace) -> int:
    from cpt_operator.api.planner import PlanIssue, load_run, plan_object, render_text

    path = Path(args.file)
    try:
        obj = load_run(path)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"cpt plan: {exc}", file=sys.stderr)
        return 2
    result = plan_object(obj, mode="local" if args.local else None, base_dir=Path.cwd())
    cost = result.estimate.cost_usd if result.estimate else None
    if args.max_cost_usd is not None and cost is not None and cost > args.max_cost_usd:
        result.warnings.append(
            PlanIssue(
                "spec.training",
                f"the estimated cost, ${cost:,.0f}, exceeds --max-cost-usd {args.max_cost_usd:g}",
            )
        )
    if args.json:
        print(result.to_json())
    else:
        name = (obj.get("metadata") or {}).get("name", "?")
        sys.stdout.write(render_text(result, title=f"ContinualPretrain {name} ({path})"))
    return 0 if result.ok else 1


def _cmd_doctor(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cpt_operator import doctor
    from cpt_operator.api.models import parse_spec
    from cpt_operator.api.planner import load_run, validation_issues

    path = Path(args.file)
    try:
        obj = load_run(path)
        spec = parse_spec(obj.get("spec") or {})
    except ValidationError as exc:
        print(f"cpt doctor: {path}: {'; '.join(map(str, validation_issues(exc)))}", file=sys.stderr)
        return 2
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"cpt doctor: {exc}", file=sys.stderr)
        return 2
    reader = doctor.KubeReader()
    ns = args.namespace or (obj.get("metadata") or {}).get("namespace") or reader.default_namespace
    checks = doctor.run_checks(spec, ns, reader)
    sys.stdout.write(doctor.render(checks))
    return doctor.exit_code(checks)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cpt")
    except PackageNotFoundError:
        return "unknown (not installed as a package)"


def _cmd_crds(args: argparse.Namespace) -> int:
    from cpt_operator.api.crd import stale_files, write_files

    root = Path(args.root)
    if args.check:
        stale = stale_files(root)
        for rel in stale:
            print(f"stale: {rel} (run `make crds`)", file=sys.stderr)
        return 1 if stale else 0
    for rel in write_files(root):
        print(f"wrote {rel}")
    return 0


def _cmd_local(args: argparse.Namespace) -> int:
    try:
        local: Any = importlib.import_module("cpt_operator.local")
    except ModuleNotFoundError as exc:
        if exc.name not in ("cpt_operator.local",):
            raise
        print(
            "cpt local: this cpt build has no local mode (module cpt_operator.local is "
            "missing); use a source checkout with the `training` extra installed",
            file=sys.stderr,
        )
        return 2
    opts = {k: v for k, v in vars(args).items() if k not in ("func", "file", "command")}
    opts = {k: v for k, v in opts.items() if v is not None}
    result = local.run_local(Path(args.file), **opts)
    return int(result) if isinstance(result, int) else 0


def _cmd_plot(args: argparse.Namespace) -> int:
    import json

    try:
        from cpt_operator import plot

        uri, name = plot.resolve_source(args.run, args.namespace)
        curves = plot.read_curves(uri)
        if args.json:
            print(json.dumps(curves.to_json()))
        if args.terminal:
            sys.stdout.write(plot.render_text(curves))
        if not args.terminal or args.output:
            out = Path(args.output or f"{name}-curves.png")
            plot.render_png(curves, out, title=f"{name} ({uri})")
            print(f"wrote {out}", file=sys.stderr)
    except ModuleNotFoundError as exc:
        print(f"cpt plot: needs {exc.name}: pip install 'cpt[plot]'", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"cpt plot: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpt", description="ContinualPretrain: continual pretraining on Kubernetes."
    )
    parser.add_argument("--version", action="version", version=f"cpt {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="check a run.yaml and estimate memory, time and cost")
    p.add_argument("file", help="a ContinualPretrain YAML file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--local", action="store_true", help="plan for `cpt local` (local paths allowed)"
    )
    p.add_argument(
        "--max-cost-usd",
        type=float,
        default=None,
        help="warn when the estimated cost exceeds this many dollars",
    )
    p.set_defaults(func=_cmd_plan)

    d = sub.add_parser(
        "doctor",
        help="check the cluster (KUBECONFIG) for what a run.yaml needs; exit 1 on blockers",
    )
    d.add_argument("file", help="a ContinualPretrain YAML file")
    d.add_argument(
        "--namespace", "-n", default=None, help="the run's namespace (default: metadata, context)"
    )
    d.set_defaults(func=_cmd_doctor)

    c = sub.add_parser("crds", help="write the generated CRD and JSON schema files")
    c.add_argument("--root", default=".", help="repository root (default: .)")
    c.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    c.set_defaults(func=_cmd_crds)

    loc = sub.add_parser("local", help="run every stage of a run.yaml as local processes")
    loc.add_argument("file", help="a ContinualPretrain YAML file")
    loc.add_argument("--workdir", default=None, help="where local state goes")
    loc.add_argument("--max-steps", type=int, default=None, help="override maxSteps")
    loc.add_argument("--nproc", type=int, default=None, help="override processesPerNode")
    loc.add_argument("--stage", default=None, help="run only this stage")
    loc.set_defaults(func=_cmd_local)

    pl = sub.add_parser(
        "plot", help="loss, lr, tokens/s and held-out loss across a run's attempts (PNG)"
    )
    pl.add_argument(
        "run", help="a run's name (its status.tensorboardUri), or a TensorBoard/checkpoint URI"
    )
    pl.add_argument("--namespace", "-n", default=None, help="the run's namespace")
    pl.add_argument("--output", "-o", default=None, help="the PNG (default: RUN-curves.png)")
    pl.add_argument("--terminal", action="store_true", help="draw the loss in the terminal")
    pl.add_argument("--json", action="store_true", help="print the plotted data as JSON")
    pl.set_defaults(func=_cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
