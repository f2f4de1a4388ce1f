"""``cpt-train preflight``: prove the training gang can compute and communicate before the run.

Runs under the same torchrun shape as training. Every rank checks its device (the node has as
many devices as processes, a small matmul gives the right answer); then all ranks time an
all-reduce of ``size_mb`` MiB and rank 0 reports the bus bandwidth:

    algbw = bytes / seconds          busbw = algbw * 2 * (n - 1) / n

``busbw`` is the number comparable across world sizes (the all_reduce_bench of the seed chapter
and nccl-tests use the same correction: a ring all-reduce moves 2(n-1)/n of the buffer through
every link). Reported in Gbit/s. One JSON line on stdout (rank 0), also written to
``result_uri``; every rank exits 1 when a device check failed or busbw is below
``min_bus_bandwidth_gbps``.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from cpt_training.config import PreflightStage
from cpt_training.native import distributed as nd

log = logging.getLogger(__name__)

WARMUP_ITERATIONS = 2


def bus_bandwidth_gbps(size_bytes: int, seconds: float, world_size: int) -> tuple[float, float]:
    """(algbw, busbw) in Gbit/s for one all-reduce of ``size_bytes`` taking ``seconds``."""
    if seconds <= 0:
        raise ValueError("seconds must be > 0")
    algbw = size_bytes * 8 / seconds / 1e9
    busbw = algbw * 2 * (world_size - 1) / world_size
    return algbw, busbw


def check_device(d: nd.Dist, expected_local: int) -> dict[str, Any]:
    """This rank's device facts and a 256x256 matmul checked against the CPU."""
    out: dict[str, Any] = {
        "rank": d.rank,
        "localRank": d.local_rank,
        "host": socket.gethostname(),
        "device": str(d.device),
        "deviceName": nd.device_name(d.device),
        "ok": True,
        "problems": [],
    }
    if d.device_type != "cpu":
        count = nd.device_count(d.device_type)
        out["deviceCount"] = count
        out["expectedDevices"] = expected_local
        if count < expected_local:
            out["problems"].append(
                f"{count} {d.device_type} devices visible, {expected_local} processes on the node"
            )
    gen = torch.Generator().manual_seed(1234 + d.rank)
    a = torch.randn(256, 256, generator=gen)
    b = torch.randn(256, 256, generator=gen)
    ref = a @ b
    try:
        t0 = time.perf_counter()
        got = (a.to(d.device) @ b.to(d.device)).cpu()
        out["matmulMs"] = round(1000 * (time.perf_counter() - t0), 3)
        err = float((got - ref).abs().max() / ref.abs().max())
        out["matmulRelErr"] = err
        if not err < 1e-2:
            out["problems"].append(f"matmul relative error {err:.3g} on {d.device}")
    except Exception as exc:  # a broken device must be reported, not crash the gang
        out["problems"].append(f"matmul on {d.device} failed: {exc}")
    out["ok"] = not out["problems"]
    return out


def time_all_reduce(d: nd.Dist, size_mb: int, iterations: int) -> dict[str, Any]:
    numel = size_mb * 1024 * 1024 // 4
    buf = torch.ones(numel, dtype=torch.float32, device=d.device)
    for _ in range(WARMUP_ITERATIONS):
        dist.all_reduce(buf)
    nd.synchronize(d.device)
    dist.barrier()
    times = []
    for _ in range(iterations):
        nd.synchronize(d.device)
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        nd.synchronize(d.device)
        times.append(time.perf_counter() - t0)
    # The collective is as slow as its slowest rank.
    t = torch.tensor([sum(times) / len(times), min(times)], dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    mean_s, best_s = (float(x) for x in t.cpu())
    size_bytes = numel * 4
    algbw, busbw = bus_bandwidth_gbps(size_bytes, mean_s, d.world_size)
    _, busbw_best = bus_bandwidth_gbps(size_bytes, best_s, d.world_size)
    return {
        "sizeBytes": size_bytes,
        "iterations": iterations,
        "meanSeconds": mean_s,
        "algBandwidthGbps": algbw,
        "busBandwidthGbps": busbw,
        "bestBusBandwidthGbps": busbw_best,
    }


def run(cfg: PreflightStage) -> int:
    """The stage; returns the process exit code."""
    d = nd.init_distributed(cfg.device)
    try:
        local = check_device(d, d.local_world_size)
        if d.device_type not in ("cpu", "cuda") and d.is_local_main:
            ls = nd.neuron_ls()
            if ls is not None:
                local["neuronLs"] = ls[-4000:]
        gathered: list[Any] = [None] * d.world_size
        dist.all_gather_object(gathered, local)
        bench = time_all_reduce(d, cfg.size_mb, cfg.iterations)
        problems = [f"rank {r['rank']}: {p}" for r in gathered for p in r["problems"]]
        if d.world_size > 1 and bench["busBandwidthGbps"] < cfg.min_bus_bandwidth_gbps:
            problems.append(
                f"bus bandwidth {bench['busBandwidthGbps']:.2f} Gbps is below "
                f"minBusBandwidthGbps {cfg.min_bus_bandwidth_gbps}"
            )
        elif d.world_size == 1 and cfg.min_bus_bandwidth_gbps > 0:
            problems.append("a world of 1 process has no bus to measure")
        result = {
            "stage": "preflight",
            "ok": not problems,
            "worldSize": d.world_size,
            "backend": d.backend,
            "deviceType": d.device_type,
            "minBusBandwidthGbps": cfg.min_bus_bandwidth_gbps,
            **bench,
            "problems": problems,
            "ranks": gathered,
        }
        if d.is_main:
            line = json.dumps(result, sort_keys=True)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            if cfg.result_uri:
                from cpt_training import storage

                storage.write_json(cfg.result_uri, result)
            for p in problems:
                log.error("preflight: %s", p)
        dist.barrier()
        return 0 if not problems else 1
    finally:
        nd.destroy()
