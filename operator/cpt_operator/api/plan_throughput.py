"""The planner's throughput model (docs/planner.md, "Throughput"): MFU predicted from a per
group efficiency and structural factors (tensor-parallel slice width, pipeline bubble,
recompute, compile), fitted on the calibration rows in ``data/calibration.yaml``. Pure;
``cpt_operator.api.planner`` re-exports every public name here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

from cpt_operator.api.models import ContinualPretrainSpec
from cpt_operator.api.plan_types import Estimate, Plan, data_table, known_models, price_per_hour
from cpt_training.flops import ModelShape, instance_type

RECOMPUTE_POLICIES = ("none", "selective", "full", "selective-op", "selective-layer")
"""Activation-checkpointing policies the throughput model knows. The first three are the API's
(``spec.training.activationCheckpointing``); the last two only describe published calibration
rows: torchtitan's per-op selective AC (recomputes every second matmul of a block) and its
per-layer selective AC (recomputes every second block)."""


def device_class(device: str) -> str:
    """Devices that share an efficiency: H200 has H100's tensor cores, A100s share one."""
    return {
        "trn1-neuroncore": "trn1",
        "trn1-chip": "trn1",
        "trn2-logical-core": "trn2",
        "trn2-physical-core": "trn2",
        "trn2-chip": "trn2",
        "h100": "h100",
        "h200": "h100",
        "a100-40": "a100",
        "a100-80": "a100",
    }.get(device, "cpu")


def pipeline_efficiency(pp: int, microbatches: int) -> float:
    """1F1B: (PP-1) of every (m + PP - 1) slots are bubble."""
    if pp <= 1:
        return 1.0
    m = max(1, microbatches)
    return m / (m + pp - 1)


def tp_slice_efficiency(hidden: int, tp: int, x0: float) -> float:
    """Per-device matmuls shrink with tensor parallel (hidden/TP columns each) and collectives
    grow; efficiency x/(x + x0) of the slice width x = hidden/TP, x0 fitted."""
    x = hidden / tp
    return x / (x + x0)


def recompute_flops_per_token(shape: ModelShape, seq_len: int, policy: str) -> float:
    """Forward FLOPs per token that activation checkpointing runs a second time (hardware FLOPs
    that MFU does not count), from the model shape, per policy:

    * ``none``: nothing.
    * ``selective`` (ours): the native trainer saves every matmul and attention output and
      recomputes only norms, RoPE, SiLU and adds (no matmul FLOPs); NxD's selective
      recomputes the attention core, which FlashAttention's backward recomputes anyway.
    * ``full``: the forward of every decoder block (the LM head is not checkpointed).
    * ``selective-op`` (torchtitan): the K, O and up projections (every second matmul).
    * ``selective-layer`` (torchtitan): the forward of every second block.
    """
    if policy in ("none", "selective"):
        return 0.0
    h, q = shape.hidden_size, shape.dim_per_head
    qd, kvd = shape.num_heads * q, shape.num_kv_heads * q
    block = 2.0 * shape.layer_params + 4.0 * shape.num_heads * q * seq_len
    if policy == "full":
        return shape.num_layers * block
    if policy == "selective-layer":
        return (shape.num_layers // 2) * block
    if policy == "selective-op":
        return shape.num_layers * 2.0 * (h * kvd + qd * h + h * shape.intermediate_size)
    raise ValueError(
        f"activation checkpointing {policy!r}; allowed: {', '.join(RECOMPUTE_POLICIES)}"
    )


def recompute_efficiency(shape: ModelShape, seq_len: int, policy: str) -> float:
    """Model FLOPs / (model FLOPs + recomputed FLOPs): the share of the device's work that MFU
    counts (0.75 for full recompute of a model without LM head; 1 without recompute)."""
    model = shape.flops_per_token(seq_len)
    return model / (model + recompute_flops_per_token(shape, seq_len, policy))


MEASURED_BY_US = "cpt"
"""``measured_by`` of calibration rows this project measured itself (bench/results/*.json)."""


@dataclass(frozen=True)
class Anchor:
    id: str
    backend: str
    instance_type: str
    shape: ModelShape
    nodes: int
    tp: int
    pp: int
    gbs: int
    micro: int
    seq: int
    tokens_per_sec_per_device: float
    ac: str
    compile: bool
    source: str
    study: str
    """Rows of one study (one publication, or our own benchmark runs) share setup beyond what
    the model sees; leave-study-out holds them out together."""
    measured_by: str = "published"
    devices: int | None = None
    """World size when the run used fewer devices than ``nodes`` full instances."""
    device_class: str | None = None
    """Overrides the device class of the instance type where the source ran other hardware."""

    @property
    def group(self) -> str:
        dev = self.device_class or device_class(instance_type(self.instance_type).device)
        return f"{self.backend}/{dev}"

    @property
    def world(self) -> int:
        return self.devices or self.nodes * instance_type(self.instance_type).processes_per_node

    @property
    def microbatches(self) -> int:
        dp = self.world // (self.tp * self.pp)
        return self.gbs // (dp * self.micro)

    @property
    def mfu(self) -> float:
        peak = instance_type(self.instance_type).device_spec.peak_flops
        if peak is None:
            raise ValueError(f"anchor {self.id}: {self.instance_type} has no peak FLOPS")
        return self.shape.flops_per_token(self.seq) * self.tokens_per_sec_per_device / peak

    def structural_factor(self, x0: float) -> float:
        return (
            tp_slice_efficiency(self.shape.hidden_size, self.tp, x0)
            * pipeline_efficiency(self.pp, self.microbatches)
            * recompute_efficiency(self.shape, self.seq, self.ac)
        )


@cache
def anchors() -> tuple[Anchor, ...]:
    out = []
    for row in data_table("calibration.yaml")["anchors"]:
        cfg = row.get("shape") or known_models()[row["model"].lower()]
        inst = instance_type(row["instance_type"])
        world = row.get("devices") or row["nodes"] * inst.processes_per_node
        if "tokens_per_sec_per_device" in row:
            tps = float(row["tokens_per_sec_per_device"])
        else:
            tps = float(row["sequences_per_sec"]) * row["seq_len"] / world
        if row["activation_checkpointing"] not in RECOMPUTE_POLICIES:
            raise ValueError(
                f"anchor {row['id']}: activation_checkpointing not in {RECOMPUTE_POLICIES}"
            )
        out.append(
            Anchor(
                id=row["id"],
                backend=row["backend"],
                instance_type=row["instance_type"],
                shape=ModelShape.from_hf_config(cfg),
                nodes=row["nodes"],
                tp=row["tensor_parallel"],
                pp=row["pipeline_parallel"],
                gbs=row["global_batch_size"],
                micro=row["micro_batch_size"],
                seq=row["seq_len"],
                tokens_per_sec_per_device=tps,
                ac=row["activation_checkpointing"],
                compile=bool(row.get("compile", False)),
                source=row["source"],
                study=row["study"],
                measured_by=row.get("measured_by", "published"),
                devices=row.get("devices"),
                device_class=row.get("device_class"),
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class EfficiencyModel:
    """mfu = group efficiency x tp_slice(hidden/TP) x pipeline bubble x recompute x compile."""

    group_efficiency: dict[str, float]
    x0: float
    compile_factor: float
    anchors_used: int

    def predict(
        self,
        group: str,
        shape: ModelShape,
        seq_len: int,
        tp: int,
        pp: int,
        microbatches: int,
        ac: str,
        compile: bool,
    ) -> tuple[float, str] | None:
        """Predicted MFU and its basis, or None where there is no peak (CPU)."""
        if group.endswith("/cpu"):
            return None
        eff = self.group_efficiency.get(group)
        basis = f"calibrated ({group})"
        if eff is None:
            # No anchor: borrow the Trainium NxD efficiency, say so.
            eff = self.group_efficiency.get("nxd/trn1", 0.25)
            basis = f"uncalibrated ({group} has no anchor; nxd/trn1 used)"
        mfu = (
            eff
            * tp_slice_efficiency(shape.hidden_size, tp, self.x0)
            * pipeline_efficiency(pp, microbatches)
            * recompute_efficiency(shape, seq_len, ac)
            * (self.compile_factor if compile and group.startswith("native/") else 1.0)
        )
        return mfu, basis


_X0_GRID = tuple(10.0 * step for step in range(401))


def fit_efficiency(rows: tuple[Anchor, ...] | list[Anchor]) -> EfficiencyModel:
    """Least squares in log space: grid over x0; per x0 the compile factor and the per-group
    efficiencies are closed-form means of the log residuals."""
    if not rows:
        raise ValueError("no calibration rows")
    # Everything but the TP slice term is independent of x0: compute it once per row.
    prepared = [
        (
            a.group,
            a.compile,
            a.shape.hidden_size / a.tp,
            math.log(a.mfu)
            - math.log(pipeline_efficiency(a.pp, a.microbatches))
            - math.log(recompute_efficiency(a.shape, a.seq, a.ac)),
        )
        for a in rows
    ]
    groups = sorted({g for g, _, _, _ in prepared})
    best: tuple[float, EfficiencyModel] | None = None
    for x0 in _X0_GRID:
        resid = [(g, c, fixed - math.log(x / (x + x0))) for g, c, x, fixed in prepared]
        # Compile factor: mean log gap between compile and eager rows of the same group.
        gaps = []
        for group in groups:
            eager = [r for g, c, r in resid if g == group and not c]
            comp = [r for g, c, r in resid if g == group and c]
            if eager and comp:
                gaps.append(sum(comp) / len(comp) - sum(eager) / len(eager))
        log_cf = sum(gaps) / len(gaps) if gaps else 0.0
        by_group: dict[str, list[float]] = {}
        for g, c, r in resid:
            by_group.setdefault(g, []).append(r - (log_cf if c else 0.0))
        log_eff = {g: sum(v) / len(v) for g, v in by_group.items()}
        err = sum((r - (log_cf if c else 0.0) - log_eff[g]) ** 2 for g, c, r in resid)
        if best is None or err < best[0] - 1e-12:
            eff = {g: math.exp(v) for g, v in log_eff.items()}
            best = (err, EfficiencyModel(eff, x0, math.exp(log_cf), len(rows)))
    assert best is not None
    return best[1]


@cache
def efficiency_model() -> EfficiencyModel:
    return fit_efficiency(anchors())


def _predict_anchor(model: EfficiencyModel, a: Anchor) -> float | None:
    if a.group not in model.group_efficiency:
        return None
    result = model.predict(a.group, a.shape, a.seq, a.tp, a.pp, a.microbatches, a.ac, a.compile)
    return None if result is None else result[0]


def calibration_report() -> list[dict[str, Any]]:
    """Per anchor: measured MFU, in-sample prediction, the leave-one-out prediction (the model
    refitted without that row) and the leave-study-out one (refitted without every row of its
    study). Held-out predictions are None when no other row of the group remains."""
    return [dict(r) for r in _calibration_report()]


@cache
def _calibration_report() -> tuple[dict[str, Any], ...]:
    rows = anchors()
    full = efficiency_model()
    report = []
    for a in rows:
        loo = _predict_anchor(fit_efficiency([b for b in rows if b.id != a.id]), a)
        lso = None
        rest = [b for b in rows if b.study != a.study]
        if any(b.group == a.group for b in rest):
            lso = _predict_anchor(fit_efficiency(rest), a)
        report.append(
            {
                "id": a.id,
                "group": a.group,
                "study": a.study,
                "measured_by": a.measured_by,
                "measured_mfu": a.mfu,
                "fitted_mfu": _predict_anchor(full, a),
                "loo_mfu": loo,
                "loo_error": None if loo is None else loo / a.mfu - 1.0,
                "lso_mfu": lso,
                "lso_error": None if lso is None else lso / a.mfu - 1.0,
            }
        )
    return tuple(report)


def throughput_estimate(spec: ContinualPretrainSpec, p: Plan, shape: ModelShape) -> Estimate | None:
    if p.instance is None or p.backend is None:
        raise RuntimeError("throughput_estimate needs the layout (_layout) first")
    group = f"{p.backend}/{device_class(p.instance.device)}"
    t = spec.training
    result = efficiency_model().predict(
        group,
        shape,
        p.seq_len,
        p.tensor_parallel,
        p.pipeline_parallel,
        p.grad_accum_steps,
        t.activation_checkpointing,
        t.compile,
    )
    peak = p.instance.device_spec.peak_flops
    if result is None or peak is None:
        return None
    mfu, basis = result
    flops_per_step = shape.flops_per_token(p.seq_len) * p.tokens_per_step
    step_seconds = flops_per_step / (p.world_size * peak * mfu)
    wall_hours = step_seconds * p.max_steps / 3600
    instance_hours = wall_hours * p.nodes
    price = price_per_hour(p.instance.name)
    return Estimate(
        step_seconds=step_seconds,
        tokens_per_sec=p.tokens_per_step / step_seconds,
        mfu=mfu,
        wall_hours=wall_hours,
        instance_hours=instance_hours,
        cost_usd=None if price is None else instance_hours * price,
        price_per_hour=price,
        basis=basis,
    )
