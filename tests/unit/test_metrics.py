"""Throughput, TFLOPS and MFU arithmetic; the metric lines; progress.json throttling."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from cpt_training import flops
from cpt_training.metrics import (
    MetricsSink,
    StepMetrics,
    Throughput,
    parse_metrics_lines,
    peak_flops_per_device,
)
from cpt_training.progress import ProgressWriter, progress_file_uri

pytestmark = pytest.mark.unit


def test_mfu_is_none_on_cpu_whatever_the_instance_type() -> None:
    assert peak_flops_per_device("cpu", "cpu") is None
    assert peak_flops_per_device("cpu", "cpu", "p5.48xlarge") is None
    t = Throughput(flops_per_token=1e9, devices=2, peak_flops=None, start_step=0)
    m = t.measure(1, 1000, loss=1.0, lr=1e-4, grad_norm=1.0)
    assert m.mfu is None
    assert m.tflops > 0


def test_gpu_peak_comes_from_the_name_or_the_instance_type() -> None:
    h100 = flops.DEVICES["h100"].peak_flops
    assert peak_flops_per_device("cuda", "NVIDIA H100 80GB HBM3") == h100
    assert peak_flops_per_device("cuda", "NVIDIA H200") == flops.DEVICES["h200"].peak_flops
    assert peak_flops_per_device("cuda", "NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_per_device("cuda", "NVIDIA H100 PCIe") is None  # different peak: unknown
    assert peak_flops_per_device("cuda", "Some GPU", "p5.48xlarge") == h100
    # An instance type of another accelerator kind does not apply.
    assert peak_flops_per_device("cuda", "Some GPU", "trn1.32xlarge") is None


def test_mfu_follows_the_torchtitan_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = flops.ModelShape(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        tie_word_embeddings=True,
    )
    fpt = shape.flops_per_token(4096)
    assert fpt == pytest.approx(9.03e9, rel=0.01)  # perf.md: Llama-3.2-1B at seq 4096
    clock = iter([0.0, 2.0])
    monkeypatch.setattr("cpt_training.metrics.time.perf_counter", lambda: next(clock))
    t = Throughput(fpt, devices=8, peak_flops=989e12, start_step=10)
    m = t.measure(20, tokens_per_step=8 * 4096 * 4, loss=2.0, lr=1e-4, grad_norm=0.5)
    tps = 10 * 8 * 4096 * 4 / 2.0
    assert m.tokens_per_sec == pytest.approx(tps)
    assert m.step_time_s == pytest.approx(0.2)
    assert m.tflops == pytest.approx(fpt * tps / 8 / 1e12)
    assert m.mfu == pytest.approx(fpt * tps / (8 * 989e12))


def test_metric_lines_are_one_json_record_plus_a_human_line() -> None:
    out = io.StringIO()
    sink = MetricsSink(max_steps=10, tensorboard_dir=None, stream=out)
    m = StepMetrics(3, 2.5, 1e-4, 0.7, 1234.0, 1.5, None, 0.25, 4096)
    sink.write(m)
    text = out.getvalue()
    records = parse_metrics_lines(text)
    assert records == [m.to_json()]
    assert "step 3/10 loss 2.5000" in text and "MFU n/a" in text


def test_tensorboard_scalars_are_written(tmp_path: Any) -> None:
    pytest.importorskip("torch")
    sink = MetricsSink(max_steps=5, tensorboard_dir=tmp_path / "tb", stream=io.StringIO())
    sink.write(StepMetrics(1, 2.0, 1e-4, 0.5, 100.0, 0.1, 0.2, 0.1, 10))
    sink.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_is_written_at_most_every_interval_but_always_on_commit() -> None:
    writes: list[dict[str, Any]] = []
    clock = _Clock()
    pw = ProgressWriter(
        "mem://progress.json",
        attempt=2,
        max_steps=100,
        min_interval_s=15,
        clock=clock,
        writer=lambda uri, obj: writes.append(obj),
    )
    assert pw.update(step=1, loss=3.0, tokens_per_sec=10.0, mfu=None, lr=1e-4)
    clock.t = 5
    assert not pw.update(step=2, loss=2.9)
    pw.committed(2)
    clock.t = 14
    assert not pw.update(step=3, loss=2.8)
    clock.t = 20.5
    assert pw.update(step=4, loss=float("nan"))
    pw.done()
    assert [w["step"] for w in writes] == [1, 2, 4, 4]
    assert writes[1]["lastCommittedStep"] == 2
    assert writes[2]["loss"] is None  # NaN is not JSON
    assert writes[-1]["done"] is True
    keys = {
        "attempt",
        "step",
        "maxSteps",
        "loss",
        "tokensPerSec",
        "mfu",
        "lr",
        "updatedAt",
        "lastCommittedStep",
        "done",
    }
    assert set(writes[0]) == keys
    assert writes[0]["attempt"] == 2 and writes[0]["updatedAt"].endswith("Z")
    json.dumps(writes)


def test_a_failing_progress_write_does_not_raise() -> None:
    def boom(uri: str, obj: Any) -> None:
        raise OSError("S3 is down")

    pw = ProgressWriter("x", attempt=1, max_steps=1, writer=boom)
    assert pw.update(step=1, force=True) is False


def test_progress_location_defaults_to_the_checkpoint_root() -> None:
    assert progress_file_uri(None, "s3://b/run/ckpt") == "s3://b/run/ckpt/progress.json"
    assert progress_file_uri("s3://b/p/", "s3://b/c") == "s3://b/p/progress.json"
    assert progress_file_uri("s3://b/p/x.json", "s3://b/c") == "s3://b/p/x.json"
