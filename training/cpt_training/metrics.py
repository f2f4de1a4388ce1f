"""Per-step training metrics: throughput, TFLOPS, MFU; stdout JSON lines and TensorBoard.

Definitions (the same for every backend):

* ``tokens_per_sec``: tokens of all ranks consumed by the optimizer steps since the previous log
  step, divided by the wall time between the two log steps. Measured between log steps (the only
  places the loop synchronises with the device), so it includes data loading, optimizer and
  checkpoint stalls: it is what the run actually achieves.
* ``tflops``: model TFLOP/s per device = ``flops_per_token * tokens_per_sec / devices / 1e12``.
* ``mfu``: model FLOPs utilization, torchtitan's definition (``torchtitan/components/metrics.py``
  after PaLM, appendix B): ``flops_per_token * tokens_per_sec / (devices * peak_flops)`` where
  ``flops_per_token = 6 * N + 12 * L * H * Q * T`` (``cpt_training.flops.ModelShape``: N without
  the input embedding, attention at full T x T, recomputation not counted). Reported as a
  fraction (0.5 = 50%); ``None`` where the device has no known peak (CPU, unknown GPUs).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from cpt_training import flops

log = logging.getLogger(__name__)


# Substrings of accelerator names -> keys of flops.DEVICES (first match wins; order matters).
_GPU_NAMES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("H200",), "h200"),
    (("H100", "HBM3"), "h100"),  # SXM parts report "H100 80GB HBM3"
    (("H100", "SXM"), "h100"),
    (("A100", "80GB"), "a100-80"),
    (("A100",), "a100-40"),
)


def peak_flops_per_device(
    device_type: str,
    device_name: str,
    instance_type: str | None = None,
    processes_per_node: int | None = None,
) -> float | None:
    """Dense BF16 peak FLOP/s of the device one process drives, or None when unknown.

    The instance type (from the run spec) wins when it names the same kind of accelerator; else
    the device's reported name is matched (H100 PCIe/NVL, whose peaks differ, stay unknown)."""
    if device_type == "cpu":
        return None
    if instance_type:
        try:
            it = flops.instance_type(instance_type)
        except ValueError:
            it = None
        if it is not None and it.accelerator == device_type:
            if processes_per_node:  # Trainium2+: the LNC follows from the process count
                it = it.for_processes(processes_per_node)
            return it.device_spec.peak_flops
    if device_type == "cuda":
        upper = device_name.upper()
        for needles, key in _GPU_NAMES:
            if all(n in upper for n in needles):
                return flops.DEVICES[key].peak_flops
    return None


@dataclass(frozen=True)
class StepMetrics:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_sec: float
    tflops: float
    mfu: float | None
    step_time_s: float
    tokens: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def human(self, max_steps: int) -> str:
        mfu = "n/a" if self.mfu is None else f"{100 * self.mfu:.1f}%"
        return (
            f"step {self.step}/{max_steps} loss {self.loss:.4f} lr {self.lr:.3e} "
            f"grad_norm {self.grad_norm:.3f} tok/s {self.tokens_per_sec:,.0f} "
            f"TFLOPS {self.tflops:.1f} MFU {mfu} step {1000 * self.step_time_s:.0f} ms"
        )


class Throughput:
    """Turns (step, tokens consumed, wall clock) at log steps into rates."""

    def __init__(
        self, flops_per_token: float, devices: int, peak_flops: float | None, start_step: int
    ) -> None:
        self.flops_per_token = flops_per_token
        self.devices = devices
        self.peak_flops = peak_flops
        self._last_t = time.perf_counter()
        self._last_step = start_step

    def reset(self, step: int) -> None:
        """Restart the window (after compilation warm-up or a checkpoint restore)."""
        self._last_t = time.perf_counter()
        self._last_step = step

    def measure(
        self, step: int, tokens_per_step: int, *, loss: float, lr: float, grad_norm: float
    ) -> StepMetrics:
        now = time.perf_counter()
        steps = max(1, step - self._last_step)
        elapsed = max(now - self._last_t, 1e-9)
        self._last_t, self._last_step = now, step
        tps = tokens_per_step * steps / elapsed
        return StepMetrics(
            step=step,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_sec=tps,
            tflops=self.flops_per_token * tps / self.devices / 1e12,
            mfu=flops.mfu(self.flops_per_token, tps, self.devices, self.peak_flops),
            step_time_s=elapsed / steps,
            tokens=tokens_per_step * steps,
        )


class MetricsSink:
    """Writes metrics on rank 0: one JSON line (prefix ``CPT_METRICS``) plus a human line on
    stdout, and TensorBoard scalars into a local dir (uploaded by the caller)."""

    JSON_PREFIX = "CPT_METRICS "
    EVAL_PREFIX = "CPT_EVAL "
    """Held-out evaluations go on their own lines: step-metric readers see steps only."""

    def __init__(
        self, *, max_steps: int, tensorboard_dir: Path | None, stream: TextIO | None = None
    ) -> None:
        self.max_steps = max_steps
        self.stream = stream or sys.stdout
        self.tensorboard_dir = tensorboard_dir
        self._writer: Any = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tensorboard_dir.mkdir(parents=True, exist_ok=True)
                self._writer = SummaryWriter(log_dir=str(tensorboard_dir), flush_secs=30)
            except Exception as exc:  # TensorBoard is optional: never fail a run over it
                log.warning("TensorBoard disabled: %s", exc)

    def write(self, m: StepMetrics) -> None:
        record = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in m.to_json().items()
        }
        self.stream.write(self.JSON_PREFIX + json.dumps(record) + "\n")
        self.stream.write(m.human(self.max_steps) + "\n")
        self.stream.flush()
        if self._writer is not None:
            w = self._writer
            w.add_scalar("train/loss", m.loss, m.step)
            w.add_scalar("train/lr", m.lr, m.step)
            w.add_scalar("train/grad_norm", m.grad_norm, m.step)
            w.add_scalar("perf/tokens_per_sec", m.tokens_per_sec, m.step)
            w.add_scalar("perf/tflops_per_device", m.tflops, m.step)
            w.add_scalar("perf/step_time_s", m.step_time_s, m.step)
            if m.mfu is not None:
                w.add_scalar("perf/mfu", m.mfu, m.step)

    def write_start(self, step: int) -> None:
        """The step this attempt starts from (0, or the restored checkpoint's): ``cpt plot``
        marks where each attempt resumed with it."""
        if self._writer is not None:
            self._writer.add_scalar("attempt/start_step", step, step)

    def write_eval(self, step: int, losses: dict[str, float | None]) -> None:
        """Held-out loss per source: a metrics line and ``eval/<source>/loss`` scalars."""
        record = {"step": step, "eval": losses}
        self.stream.write(self.EVAL_PREFIX + json.dumps(record) + "\n")
        self.stream.flush()
        if self._writer is not None:
            for name, loss in losses.items():
                if loss is not None and math.isfinite(loss):
                    self._writer.add_scalar(f"eval/{name}/loss", loss, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def parse_metrics_lines(text: str, prefix: str = MetricsSink.JSON_PREFIX) -> list[dict[str, Any]]:
    """The JSON metric records in a log (tests, benchmarks); ``MetricsSink.EVAL_PREFIX``:
    the held-out evaluations instead."""
    out = []
    for line in text.splitlines():
        idx = line.find(prefix)
        if idx >= 0:
            out.append(json.loads(line[idx + len(prefix) :]))
    return out
