"""The planner's human-readable output: the ``cpt plan`` table and the calibration table in
docs/planner.md. ``cpt_operator.api.planner`` re-exports both.
"""

from __future__ import annotations

from cpt_operator.api.mixture_plan import render_rows
from cpt_operator.api.plan_throughput import calibration_report, efficiency_model
from cpt_operator.api.plan_types import Estimate, MemoryEstimate, Plan, price_table, to_gib
from cpt_training.flops import InstanceType, ModelShape


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def render_text(p: Plan, title: str = "") -> str:
    """The table ``cpt plan`` prints."""
    lines: list[str] = []
    if title:
        lines.append(title)
    if not p.ok:
        lines.append("INVALID spec:")
        lines += [f"  ✗ {e}" for e in p.errors]
        lines += [f"  ! {w}" for w in p.warnings]
        return "\n".join(lines) + "\n"
    if not (p.instance and p.shape and p.memory):
        raise RuntimeError("a plan without errors has a layout, a shape and a memory figure")
    rows = _layout_rows(p, p.instance, p.shape) + _memory_rows(p.memory)
    rows += _estimate_rows(p.estimate)
    rows.append(("checkpoint", f"~{to_gib(p.checkpoint_bytes or 0):,.0f} GiB per save"))
    if p.pod_security is not None:
        rows.append(("pod security", f"namespace must allow {p.pod_security.summary()}"))
    width = max(len(k) for k, _ in rows)
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"! {w}" for w in p.warnings]
    return "\n".join(lines) + "\n"


def _layout_rows(p: Plan, instance: InstanceType, shape: ModelShape) -> list[tuple[str, str]]:
    """Backend, world, parallelism, batch, tokens, steps, mixture and model rows."""
    return [
        ("backend", f"{p.backend} on {instance.name} ({p.mode})"),
        (
            "world",
            f"{p.nodes} nodes x {p.processes_per_node} processes = {p.world_size} "
            f"({instance.device_spec.name})",
        ),
        (
            "parallelism",
            f"TP {p.tensor_parallel} x PP {p.pipeline_parallel} x DP {p.data_parallel}"
            + (f" (kv_size_multiplier {p.kv_size_multiplier})" if p.kv_size_multiplier > 1 else ""),
        ),
        (
            "batch",
            f"global {p.tokens_per_step // p.seq_len} = micro {p.micro_batch_size} x DP "
            f"{p.data_parallel} x {p.grad_accum_steps} "
            + ("pipeline microbatches" if p.pipeline_parallel > 1 else "grad-accum steps"),
        ),
        ("tokens/step", f"{_fmt_int(p.tokens_per_step)} (seq {p.seq_len})"),
        ("steps", f"{_fmt_int(p.max_steps)} = {p.total_tokens / 1e9:.3g} B tokens"),
        *render_rows(p.mixture),
        (
            "model",
            f"{shape.total_params / 1e9:.2f} B params, "
            f"{shape.flops_per_token(p.seq_len) / 1e9:.1f} GFLOP/token",
        ),
    ]


def _memory_rows(m: MemoryEstimate) -> list[tuple[str, str]]:
    """The most loaded stage's bytes per device and their breakdown."""
    rows: list[tuple[str, str]] = []
    dev = m.device_bytes
    mem = f"{to_gib(m.total)} GiB"
    if dev:
        mem += f" of {to_gib(dev)} GiB ({100 * m.total / dev:.0f}%)"
    rows.append(("memory/device", f"{mem}, {m.stage}"))
    rows.append(
        (
            "  breakdown",
            f"weights {to_gib(m.weights)} + grads {to_gib(m.grads)} + optimizer "
            f"{to_gib(m.optimizer)} + activations {to_gib(m.activations)} + runtime "
            f"{to_gib(m.reserved)} GiB",
        )
    )
    return rows


def _estimate_rows(est: Estimate | None) -> list[tuple[str, str]]:
    """Step time, MFU, wall time and cost, or why there is no estimate."""
    rows: list[tuple[str, str]] = []
    if est is None:
        rows.append(("estimate", "none (no peak FLOPS for this device)"))
    else:
        rows += [
            ("step time", f"~{est.step_seconds:.1f} s ({est.tokens_per_sec:,.0f} tokens/s)"),
            ("MFU", f"~{100 * est.mfu:.1f}% [{est.basis}]"),
            ("wall time", f"~{est.wall_hours:.1f} h ({est.instance_hours:,.0f} instance-hours)"),
            (
                "cost",
                "n/a (no list price)"
                if est.cost_usd is None
                else f"~${est.cost_usd:,.0f} at ${est.price_per_hour}/h "
                f"({price_table()['region']} on-demand list, {price_table()['as_of']})",
            ),
        ]
    return rows


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}%" if signed else f"{100 * x:.1f}%"


def calibration_markdown() -> str:
    """The calibration table in docs/planner.md (a unit test keeps the two in step)."""
    model = efficiency_model()
    report = calibration_report()
    lines = [
        "| anchor | group | measured by | measured MFU | fitted | leave-one-out | LOO error "
        "| leave-study-out error |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report:
        lines.append(
            f"| {r['id']} | {r['group']} | {r['measured_by']} | {_pct(r['measured_mfu'])} | "
            f"{_pct(r['fitted_mfu'])} | {_pct(r['loo_mfu'])} | {_pct(r['loo_error'], True)} | "
            f"{_pct(r['lso_error'], True)} |"
        )
    effs = ", ".join(f"{g} {100 * e:.1f}%" for g, e in sorted(model.group_efficiency.items()))
    lines += [
        "",
        f"Fitted on {model.anchors_used} rows: group efficiencies {effs}; x0 = {model.x0:g}; "
        f"compile factor {model.compile_factor:.2f}.",
        "",
        "| group | rows | mean \\|LOO error\\| | max \\|LOO error\\| | max \\|leave-study-out\\| |",
        "|---|---:|---:|---:|---:|",
    ]
    for group in sorted({r["group"] for r in report}):
        rows = [r for r in report if r["group"] == group]
        loo = [abs(r["loo_error"]) for r in rows if r["loo_error"] is not None]
        lso = [abs(r["lso_error"]) for r in rows if r["lso_error"] is not None]
        mean = _pct(sum(loo) / len(loo)) if loo else "not measurable (one row)"
        lines.append(
            f"| {group} | {len(rows)} | {mean} | {_pct(max(loo) if loo else None)} | "
            f"{_pct(max(lso) if lso else None)} |"
        )
    return "\n".join(lines) + "\n"
