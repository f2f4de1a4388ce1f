"""Preflight on a real 2-process torchrun gang (gloo on CPU): bandwidth, device checks, exit."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from cpt_training import storage
from cpt_training.preflight import bus_bandwidth_gbps
from cpt_training.testing import torchrun_train

pytestmark = pytest.mark.integration


def _preflight(cfg: dict[str, Any], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = torchrun_train(
        cfg, nproc, timeout=300, stage="preflight"
    )
    return result


def _result_line(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout
    result: dict[str, Any] = json.loads(lines[0])
    return result


def test_bus_bandwidth_uses_the_ring_correction() -> None:
    algbw, busbw = bus_bandwidth_gbps(125_000_000, 1.0, 4)  # 1 Gbit in 1 s
    assert algbw == pytest.approx(1.0)
    assert busbw == pytest.approx(1.5)  # 2 * 3 / 4
    assert bus_bandwidth_gbps(10, 1.0, 1)[1] == 0.0


def test_two_cpu_processes_report_bus_bandwidth_and_write_the_result(
    s3_env: Any, bucket: str
) -> None:
    uri = f"s3://{bucket}/runs/r1/preflight.json"
    proc = _preflight(
        {"stage": "preflight", "device": "cpu", "sizeMb": 4, "iterations": 3, "resultUri": uri}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _result_line(proc.stdout)
    assert result["ok"] is True
    assert result["worldSize"] == 2 and result["backend"] == "gloo"
    assert result["busBandwidthGbps"] > 0
    assert result["algBandwidthGbps"] == pytest.approx(result["busBandwidthGbps"])  # n=2: x1
    assert [r["rank"] for r in result["ranks"]] == [0, 1]
    assert all(r["ok"] and r["matmulRelErr"] < 1e-4 for r in result["ranks"])
    assert storage.read_json(uri) == result


def test_an_impossible_bandwidth_threshold_exits_1() -> None:
    proc = _preflight({"device": "cpu", "sizeMb": 1, "iterations": 2, "minBusBandwidthGbps": 1e9})
    assert proc.returncode != 0
    result = _result_line(proc.stdout)
    assert result["ok"] is False
    assert any("below minBusBandwidthGbps" in p for p in result["problems"])
