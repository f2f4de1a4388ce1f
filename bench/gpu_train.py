"""Goals 1, 2 and the checkpoint stall of goal 4: the native trainer on GPUs.

``python bench/gpu_train.py --suite single`` (one H100): builds a Llama-3.2-1B-shaped model with
random weights (``save_pretrained``, safetensors), tokenizes the offline corpus with the real
tokenize stage into 4096-token blocks, then runs the real ``cpt-train train`` stage
(``cpt_training.cli.main(["train"])`` with ``CPT_STAGE_CONFIG``) under torchrun, with
measurement hooks around it:

* per-step throughput and MFU from the trainer's own metrics (``MetricsSink``), log every step;
* before the loop, on the same model/optimizer: a step-time breakdown with CUDA events
  (forward, backward, grad clip + optimizer) and a ``torch.profiler`` kernel summary;
* peak GPU memory of the loop; data-loader wait per step;
* checkpoint stalls: the time each ``DcpCheckpointer.save`` blocks the loop, plus any wait for
  staging before the next optimizer step. The first save uses DCP's default (blocking)
  staging, later ones the trainer's own staging: both are measured in the same run.

Then transformers' ``Trainer`` on the same model, batch, precision and SDPA attention
(``bench/hf_trainer_baseline.py``), in the same command.

``--suite scaling`` (two H200s): the same trainer on one GPU, then FSDP2 over two GPUs, same
per-GPU batch, no checkpoints, in one command.

``--tiny`` runs the whole harness on CPU with a tiny model (a smoke test of the harness).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, train_matrix


def llama3_rope(factor: float) -> dict[str, Any]:
    """Llama 3's rope scaling as its config.json spells it (3.2: factor 32, 3.1: factor 8)."""
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B's config.json (shape only; weights are random).
    "llama-3.2-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_parameters": llama3_rope(32.0),
    },
    # Llama-3.2-3B's config.json (shape only).
    "llama-3.2-3b": {
        "vocab_size": 128256,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_parameters": llama3_rope(32.0),
    },
    # Llama-3.1-8B's config.json (shape only; the 1-GPU runs of issue 21 cut its layers).
    "llama-3.1-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_parameters": llama3_rope(8.0),
    },
    "tiny": {
        "vocab_size": 32000,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
}

RESULT_PREFIX = "BENCH_RESULT "


def shape_text(shape: str, layers: int = 0) -> str:
    """The model shape in one line, for the results' configuration."""
    c = shape_config(shape, layers)
    return (
        f"vocab {c['vocab_size']}, hidden {c['hidden_size']}, MLP {c['intermediate_size']}, "
        f"{c['num_hidden_layers']} layers, {c['num_attention_heads']}/"
        f"{c['num_key_value_heads']} heads, tied embeddings {c['tie_word_embeddings']}"
    )


# -- setup ---------------------------------------------------------------------------------------


def carry_dir() -> Path:
    """Inputs prepared on the host and carried to the GPU machine (``bench/work/carry``)."""
    return common.WORK / "carry"


def prepare_carry(vocab: int = 32000) -> Path:
    """Corpus jsonl + 32k tokenizer, built here (no GPU needed) and carried with the call."""
    common.bootstrap()
    from cpt_training.corpus import python_docs, train_bpe_tokenizer

    out = carry_dir()
    corpus = out / "corpus"
    tok = out / "tok32k"
    if not (tok / "tokenizer.json").is_file() or not (corpus / "part-000.jsonl").is_file():
        docs = list(python_docs())
        corpus.mkdir(parents=True, exist_ok=True)
        with open(corpus / "part-000.jsonl", "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        src = common.WORK / "tokenize" / "tok32k"
        if (src / "tokenizer.json").is_file():
            shutil.copytree(src, tok, dirs_exist_ok=True)
        else:
            train_bpe_tokenizer(docs, tok, vocab_size=vocab)
    return out


def make_data(work: Path, seq: int, tok_dir: Path, corpus: Path, repeat: int = 4) -> Path:
    """Tokenized blocks of ``seq`` tokens via the real tokenize stage."""
    common.bootstrap()
    from cpt_training.config import TokenizeStage
    from cpt_training.tokenize import run_tokenize

    src = work / f"corpus-x{repeat}"
    if not src.is_dir():
        src.mkdir(parents=True)
        text = (corpus / "part-000.jsonl").read_text(encoding="utf-8")
        for i in range(repeat):
            (src / f"part-{i:03d}.jsonl").write_text(text, encoding="utf-8")
    out = work / f"data-{seq}"
    cfg = TokenizeStage.model_validate(
        {
            "sources": [{"uri": str(src)}],
            "tokenizerUri": str(tok_dir),
            "outputUri": str(out),
            "blockSize": seq,
            "numShards": 1,
            "shardIndex": 0,
            "workers": min(4, common.usable_cores()),
        }
    )
    run_tokenize(cfg)
    return out


def shape_config(shape: str, layers: int = 0) -> dict[str, Any]:
    """The shape's config fields, with ``layers`` blocks instead of the model's where given
    (the 1-GPU runs of a model too large for one GPU)."""
    c = dict(SHAPES[shape])
    if layers:
        c["num_hidden_layers"] = layers
    return c


def make_model(work: Path, shape: str, device: str, layers: int = 0) -> Path:
    """A random-weight HF Llama dir (config.json + safetensors) of the given shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = work / (f"model-{shape}" + (f"-{layers}l" if layers else ""))
    if (out / "config.json").is_file():
        return out
    c = shape_config(shape, layers)
    config = LlamaConfig(**c, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=torch.bfloat16)  # type: ignore[call-arg]
    model.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def train_config(
    *,
    model_dir: Path,
    data_dir: Path,
    ckpt_dir: Path,
    seq: int,
    micro: int,
    accum: int,
    world: int,
    steps: int,
    every: int,
    compile_model: bool,
    ac: str,
    device: str,
) -> dict[str, Any]:
    """The train-stage config (wire format) the operator would hand to ``cpt-train train``."""
    return {
        "stage": "train",
        "backend": "native",
        "device": device,
        "runName": "bench",
        "modelUri": str(model_dir),
        "dataUri": str(data_dir),
        "seqLen": seq,
        "globalBatchSize": micro * accum * world,
        "microBatchSize": micro,
        # max > steps run: no final save at the end, only the every-N ones being measured.
        "maxSteps": steps + 1000,
        "stopAfterSteps": steps,
        "precision": "bf16",
        "activationCheckpointing": ac,
        "compile": compile_model,
        "optimizer": {"lr": 3e-4, "minLr": 3e-5, "warmupSteps": 5},
        "checkpoint": {
            # The durable root is the local dir itself: the syncer hashes and commits in
            # place (no second copy on the machine's disk).
            "uri": str(ckpt_dir),
            "localDir": str(ckpt_dir),
            "everySteps": every,
            "keep": 1,
            "asyncSave": True,
        },
        "logEvery": 1,
    }


# -- the worker: runs inside torchrun, one process per GPU ---------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.saves: list[dict[str, Any]] = []
        self.staged_waits: list[dict[str, Any]] = []
        self.data_waits: list[float] = []
        self.breakdown: dict[str, Any] = {}
        self.memory: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _kernel_category(name: str) -> str:
    n = name.lower()
    if "nccl" in n:
        return "communication (NCCL)"
    if any(k in n for k in ("flash", "fmha", "attention", "cudnn")):
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "_mma")):
        return "matmul"
    if "triton" in n:
        return "fused elementwise/reduction (inductor/triton)"
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    if "adam" in n or "foreach" in n or "multi_tensor" in n:
        return "optimizer"
    return "other kernels"


def _is_annotation(name: str) -> bool:
    """GPU-side ranges of ``record_function`` annotations (FSDP, the optimizer step): they
    span kernels that are counted on their own, so summing them would count twice."""
    return "#" in name or name.startswith(("FSDP::", "ProfilerStep", "## "))


def profile_summary(prof: Any, steps: int) -> dict[str, Any]:
    """GPU time per kernel category and the top kernels, per step."""
    from torch.autograd import DeviceType  # type: ignore[attr-defined]

    cats: dict[str, float] = {}
    kernels: list[tuple[str, float, int]] = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        t = float(getattr(e, "self_device_time_total", 0.0) or 0.0)
        if t <= 0 or _is_annotation(e.key):
            continue
        cats[_kernel_category(e.key)] = cats.get(_kernel_category(e.key), 0.0) + t
        kernels.append((e.key, t, int(e.count)))
    total = sum(cats.values()) or 1.0
    kernels.sort(key=lambda k: -k[1])
    return {
        "gpuMsPerStep": total / 1000.0 / steps,
        "categories": {
            k: {"msPerStep": v / 1000.0 / steps, "share": v / total}
            for k, v in sorted(cats.items(), key=lambda kv: -kv[1])
        },
        "topKernels": [
            {"name": n[:160], "msPerStep": t / 1000.0 / steps, "callsPerStep": c / steps}
            for n, t, c in kernels[:15]
        ],
    }


def kernel_intervals(prof: Any) -> list[tuple[float, float, str]]:
    """(start us, end us, category) of every GPU kernel/copy the profiler recorded."""
    from torch.autograd import DeviceType  # type: ignore[attr-defined]

    out = []
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA or _is_annotation(e.name):
            continue
        tr = e.time_range
        out.append((float(tr.start), float(tr.end), _kernel_category(e.name)))
    return out


def run_breakdown(
    tr: Any, warm: int, steps: int, prof_steps: int, out_dir: Path | None
) -> dict[str, Any]:
    """Forward / backward / optimizer times of full steps on the trainer's own model,
    optimizer and data, with CUDA events (the same work as ``Trainer._step``)."""
    import torch

    cuda = tr.d.device_type == "cuda"
    tr.begin_training()
    it = tr._batches(0)
    rows = []
    t_first = time.perf_counter()
    tr_warm = 0.0
    for i in range(warm + steps):
        batches = next(it)
        _count, scale = tr._loss_scale(batches)
        marks: list[tuple[str, Any]] = []

        def mark(marks: list[tuple[str, Any]], label: str) -> None:
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                ev.record()
                marks.append((label, ev))
            else:
                marks.append((label, time.perf_counter()))

        bwd = 0.0
        mark(marks, "start")
        last = len(batches) - 1
        for j, (ids_h, lab_h) in enumerate(batches):
            mark(marks, "f0")
            tr._micro_step(ids_h, lab_h, scale, last=j == last)
            mark(marks, "b1")
        norm = tr._optimizer_step()
        mark(marks, "o1")
        _sync()

        def dt(a: Any, b: Any) -> float:
            return float(a.elapsed_time(b)) if cuda else (b - a) * 1000.0

        evs = marks
        for k in range(1, len(evs)):
            lab = evs[k][0]
            d = dt(evs[k - 1][1], evs[k][1])
            if lab == "b1":
                bwd += d  # forward + backward of a micro batch (one call of the trainer's)
        opt = dt(evs[-2][1], evs[-1][1])
        total = dt(evs[0][1], evs[-1][1])
        if i == warm - 1:
            tr_warm = time.perf_counter() - t_first
        if i >= warm:
            rows.append(
                {
                    "forwardBackwardMs": bwd,
                    "optimizerMs": opt,
                    "stepMs": total,
                    "gradNorm": float(norm),
                }
            )
    res: dict[str, Any] = {
        "warmupSteps": warm,
        "warmupSeconds": tr_warm,
        "steps": rows,
    }
    for key in ("forwardBackwardMs", "optimizerMs", "stepMs"):
        res[key] = common.median([r[key] for r in rows])
    res["otherMs"] = res["stepMs"] - res["forwardBackwardMs"] - res["optimizerMs"]
    if cuda and prof_steps > 0:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(prof_steps):
                tr._step(next(it))
            _sync()
        res["profile"] = profile_summary(prof, prof_steps)
        try:
            res["profile"]["kernelTable"] = train_matrix.kernel_table(
                kernel_intervals(prof), prof_steps, res["stepMs"]
            )
        except Exception as exc:  # the table is a report; never lose the run over it
            res["profile"]["kernelTableError"] = repr(exc)[:300]
        if out_dir is not None:
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
            (out_dir / "profile-kernels.txt").write_text(table)
    close = getattr(it, "close", None)
    if close is not None:
        close()
    return res


def install_hooks(rec: Recorder, args: argparse.Namespace) -> None:
    """Measurement hooks on the real classes; the trainer itself runs unmodified."""
    import torch

    from cpt_training.metrics import MetricsSink
    from cpt_training.native import checkpointing as ck
    from cpt_training.native import train as nt

    orig_write = MetricsSink.write

    def write(self: Any, m: Any) -> None:
        rec.steps.append({**m.to_json(), "t": time.perf_counter()})
        orig_write(self, m)

    MetricsSink.write = write  # type: ignore[method-assign]

    orig_save = ck.DcpCheckpointer.save

    def save(self: Any, step: int) -> None:
        legacy = len(rec.saves) < args.legacy_saves and hasattr(self, "_stager")
        kept = getattr(self, "_stager", None)
        if legacy:
            self._stager = None  # DCP's default: blocking staging into pageable memory
        t_wait = time.perf_counter()
        self.wait()  # the previous write, timed apart (save() would wait for it too)
        t0 = time.perf_counter()
        try:
            orig_save(self, step)
        finally:
            dt = time.perf_counter() - t0
            if legacy:
                self._stager = kept
        entry = {
            "step": step,
            "blockingSeconds": dt,
            "waitPreviousWriteSeconds": t0 - t_wait,
            "staging": "dcp-default" if legacy or kept is None else "trainer (pinned, async)",
        }
        fut = getattr(self, "_in_flight", None)
        if fut is not None:

            def done(f: Any, e: dict[str, Any] = entry, t: float = t0) -> None:
                e["writeSeconds"] = time.perf_counter() - t
                if f.exception() is not None:
                    e["writeError"] = repr(f.exception())[:300]

            fut.add_done_callback(done)
        rec.saves.append(entry)

    ck.DcpCheckpointer.save = save  # type: ignore[method-assign]

    if hasattr(ck.DcpCheckpointer, "wait_staged"):
        orig_wait = ck.DcpCheckpointer.wait_staged

        def wait_staged(self: Any) -> None:
            pending = getattr(self, "_staging", None) is not None
            t0 = time.perf_counter()
            orig_wait(self)
            if pending:
                rec.staged_waits.append(
                    {"afterSave": len(rec.saves), "seconds": time.perf_counter() - t0}
                )

        ck.DcpCheckpointer.wait_staged = wait_staged  # type: ignore[method-assign]

    orig_batches = nt.Trainer._batches

    def batches(self: Any, start_step: int) -> Any:
        inner = orig_batches(self, start_step)

        def timed() -> Any:
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(inner)
                except StopIteration:
                    return
                rec.data_waits.append(time.perf_counter() - t0)
                yield item

        return timed()

    orig_loop = nt.Trainer._loop

    def loop(self: Any, start: int) -> None:
        cuda = self.d.device_type == "cuda"
        if args.breakdown_steps:
            rec.breakdown = run_breakdown(
                self,
                args.breakdown_warmup,
                args.breakdown_steps,
                args.profile_steps,
                Path(args.out_dir) if args.out_dir and self.d.is_main else None,
            )
        rec.data_waits.clear()
        nt.Trainer._batches = batches  # type: ignore[method-assign]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        orig_loop(self, start)
        rec.extra["loopSeconds"] = time.perf_counter() - t0
        if cuda:
            rec.memory = {
                "peakAllocatedGiB": torch.cuda.max_memory_allocated() / 2**30,
                "peakReservedGiB": torch.cuda.max_memory_reserved() / 2**30,
                "deviceTotalGiB": torch.cuda.get_device_properties(0).total_memory / 2**30,
            }
        rec.extra.update(
            {
                "worldSize": self.d.world_size,
                "tokensPerStep": self.plan.tokens_per_step,
                "flopsPerToken": self.shape.flops_per_token(self.cfg.seq_len),
                "params": self.shape.total_params,
                "peakFlopsPerDevice": self.throughput.peak_flops,
                "device": str(self.d.device),
            }
        )

    nt.Trainer._loop = loop  # type: ignore[method-assign]


def worker(args: argparse.Namespace) -> int:
    common.bootstrap()
    cfg = json.loads(Path(args.config).read_text())
    os.environ["CPT_STAGE_CONFIG"] = json.dumps(cfg)
    rec = Recorder()
    install_hooks(rec, args)
    from cpt_training import cli

    t0 = time.perf_counter()
    rc = cli.main(["train"])
    wall = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        import torch

        out = {
            "rc": rc,
            "config": cfg,
            "wallSeconds": wall,
            "steps": rec.steps,
            "saves": rec.saves,
            "stagedWaits": rec.staged_waits,
            "dataWaits": rec.data_waits,
            "breakdown": rec.breakdown,
            "memory": rec.memory,
            "torch": torch.__version__,
            "deviceName": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            **rec.extra,
        }
        Path(args.result).write_text(json.dumps(out, indent=1))
    return rc


# -- analysis (pure; unit-tested) ------------------------------------------------------------------


def steady_steps(result: dict[str, Any], warmup: int) -> list[dict[str, Any]]:
    """Steps after warm-up whose timing window holds no checkpoint save: the save of step k is
    called after step k's log, so it falls into step k+1's window."""
    save_steps = {s["step"] for s in result.get("saves", [])}
    first = min(save_steps) if save_steps else None
    out = []
    for s in result["steps"]:
        if s["step"] <= warmup:
            continue
        if first is not None and s["step"] > first:
            continue  # background checkpoint writes from here on: measured separately
        out.append(s)
    return out


def summarize_run(result: dict[str, Any], warmup: int) -> dict[str, Any]:
    steady = steady_steps(result, warmup)
    if not steady:
        raise ValueError("no steady-state steps: raise the step count or lower the warm-up")
    times = [s["step_time_s"] for s in steady]
    med = common.median(times)
    tps = result["tokensPerStep"] / med
    peak = result.get("peakFlopsPerDevice")
    world = result.get("worldSize", 1)
    mfu = result["flopsPerToken"] * tps / (world * peak) if peak else None
    after = [s for s in result["steps"] if s["step"] > warmup]
    waits = result.get("dataWaits", [])
    return {
        "steadySteps": len(steady),
        "medianStepSeconds": med,
        "stepTimeCv": common.cv(times),
        "tokensPerSec": tps,
        "tokensPerSecPerDevice": tps / world,
        "mfu": mfu,
        "sustainedTokensPerSec": (
            sum(result["tokensPerStep"] for _ in after) / sum(s["step_time_s"] for s in after)
            if after
            else None
        ),
        "dataWaitMedianMs": common.median(waits) * 1000 if waits else None,
        "dataWaitShare": (common.median(waits) / med) if waits else None,
    }


STALL_WINDOW = 5
"""Steps after a save whose extra time is charged to it (blocking call, staging, contention)."""


def failed_writes(log_path: Path) -> set[int]:
    """Steps whose background checkpoint write failed, from the trainer's log."""
    import re

    if not log_path.is_file():
        return set()
    pat = re.compile(r"checkpoint step (\d+): background write failed")
    return {int(m.group(1)) for m in pat.finditer(log_path.read_text(errors="replace"))}


def save_costs(result: dict[str, Any], median: float) -> list[dict[str, Any]]:
    """Per save: the loop time lost in the ``STALL_WINDOW`` steps after it (step time minus the
    steady median, summed), how much of that was waiting for the previous save's write, and
    the extra time of all steps up to the next save (background write contention)."""
    saves = result.get("saves", [])
    steps = {s["step"]: s["step_time_s"] for s in result["steps"]}
    last = max(steps) if steps else 0
    out = []
    for i, sv in enumerate(saves):
        k = sv["step"]
        nxt = saves[i + 1]["step"] if i + 1 < len(saves) else last
        window = [
            steps[j] - median for j in range(k + 1, min(k + STALL_WINDOW, nxt) + 1) if j in steps
        ]
        until = [steps[j] - median for j in range(k + 1, nxt + 1) if j in steps]
        prev = float(sv.get("waitPreviousWriteSeconds", 0.0))
        lost = sum(window)
        out.append(
            {
                "step": k,
                "staging": sv.get("staging"),
                "lostSeconds": lost,
                "waitPreviousWriteSeconds": prev,
                "stallSeconds": lost - prev,
                "saveCallSeconds": sv.get("blockingSeconds"),
                "lostUntilNextSaveSeconds": sum(until),
                "stepsUntilNextSave": len(until),
                "backgroundWriteSeconds": sv.get("writeSeconds"),
                "writeError": sv.get("writeError"),
            }
        )
    return out


def stall_measurements(
    nat: dict[str, Any],
    median: float,
    machine: str,
    cfg: dict[str, Any],
    every: int,
    failed: set[int],
    prefix: str = "ckpt.stall",
    async_label: str = "async",
) -> list[dict[str, Any]]:
    """One measurement per save. ``async_label`` names the trainer's staging in the results;
    the goal applies to the current one (``async``) only."""
    waits = {w["afterSave"]: w["seconds"] for w in nat.get("stagedWaits", [])}
    items = []
    for i, c in enumerate(save_costs(nat, median), start=1):
        label = "legacy" if c["staging"] == "dcp-default" else async_label
        ok = c["step"] not in failed and not c.get("writeError")
        items.append(
            common.measurement(
                f"{prefix}.save{i}.{label}",
                machine,
                {
                    **cfg,
                    "checkpointStep": c["step"],
                    "everySteps": every,
                    "staging": c["staging"],
                    "target": "local disk",
                },
                "s",
                c["stallSeconds"],
                goal=common.goal("<=", 0.5) if label == "async" else None,
                details={
                    **c,
                    "writeSucceeded": ok,
                    "waitBeforeNextOptimizerStep": waits.get(i, 0.0),
                    "medianStepSeconds": median,
                    "definition": f"sum over the {STALL_WINDOW} steps after the save of (step "
                    "time - steady median step time), minus any wait for the previous save's "
                    "write (reported apart)",
                },
            )
        )
    return items


# -- orchestration -------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.REPO), str(common.REPO / "training"), str(common.REPO / "operator")]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Several GPUs of one host: NVLink multicast stays off (shared host; see the device docs).
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    return env


def launch(
    name: str,
    cfg: dict[str, Any],
    nproc: int,
    work: Path,
    out_dir: Path,
    extra: list[str],
    timeout: float,
) -> dict[str, Any]:
    cfg_path = work / f"{name}.config.json"
    cfg_path.write_text(json.dumps(cfg))
    res_path = work / f"{name}.result.json"
    res_path.unlink(missing_ok=True)
    log_path = out_dir / f"{name}.log"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "bench.gpu_train",
        "worker",
        "--config",
        str(cfg_path),
        "--result",
        str(res_path),
        "--out-dir",
        str(out_dir),
        *extra,
    ]
    t0 = time.perf_counter()
    print(f"[{name}] {' '.join(cmd[3:6])} ...", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd,
            cwd=common.REPO,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    print(f"[{name}] rc={proc.returncode} in {time.perf_counter() - t0:.0f}s", flush=True)
    if proc.returncode != 0 or not res_path.is_file():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{name} failed (rc {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(res_path.read_text())
    shutil.copy(res_path, out_dir / res_path.name)
    return result


def run_hf(
    model_dir: Path,
    seq: int,
    micro: int,
    accum: int,
    steps: int,
    warmup: int,
    out_dir: Path,
    timeout: float,
) -> dict[str, Any]:
    res_path = out_dir / "hf-trainer.result.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.hf_trainer_baseline",
        "--model-dir",
        str(model_dir),
        "--seq",
        str(seq),
        "--micro",
        str(micro),
        "--accum",
        str(accum),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--result",
        str(res_path),
    ]
    print("[hf-trainer] ...", flush=True)
    t0 = time.perf_counter()
    with open(out_dir / "hf-trainer.log", "w") as log:
        proc = subprocess.run(
            cmd,
            cwd=common.REPO,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    print(f"[hf-trainer] rc={proc.returncode} in {time.perf_counter() - t0:.0f}s", flush=True)
    if proc.returncode != 0 or not res_path.is_file():
        raise RuntimeError(
            f"HF baseline failed:\n{(out_dir / 'hf-trainer.log').read_text()[-4000:]}"
        )
    out: dict[str, Any] = json.loads(res_path.read_text())
    return out


def planner_input(cfg: dict[str, Any], result: dict[str, Any], hidden: int) -> dict[str, Any]:
    return {
        "group": "native/h100",
        "hidden": hidden,
        "tp": 1,
        "microbatches": cfg["globalBatchSize"] // (cfg["microBatchSize"] * result["worldSize"]),
        "ac": cfg["activationCheckpointing"],
        "compile": cfg["compile"],
    }


def suite_single(
    args: argparse.Namespace, work: Path, out_dir: Path, machine: str
) -> list[dict[str, Any]]:
    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    shape = "tiny" if tiny else "llama-3.2-1b"
    seq = 128 if tiny else 4096
    carry = prepare_carry()
    t0 = time.perf_counter()
    data = make_data(work, seq, carry / "tok32k", carry / "corpus")
    model = make_model(work, shape, device)
    print(f"setup (data + model) {time.perf_counter() - t0:.0f}s", flush=True)
    ckpt = work / "ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    steps, every, warm = args.steps, args.every, args.warmup
    cfg = train_config(
        model_dir=model,
        data_dir=data,
        ckpt_dir=ckpt,
        seq=seq,
        micro=args.micro,
        accum=args.accum,
        world=1,
        steps=steps,
        every=every,
        compile_model=not tiny,
        ac=args.ac,
        device=device,
    )
    extra = [
        "--breakdown-warmup",
        "2" if tiny else "3",
        "--breakdown-steps",
        "3",
        "--profile-steps",
        "0" if tiny else "2",
        "--legacy-saves",
        "1",
    ]
    nat = launch("native-1gpu", cfg, 1, work, out_dir, extra, timeout=args.timeout)
    shutil.rmtree(ckpt, ignore_errors=True)
    import importlib.util

    hf: dict[str, Any] | None = None
    if importlib.util.find_spec("accelerate") is not None:  # transformers' Trainer needs it
        hf = run_hf(model, seq, args.micro, args.accum, args.hf_steps, warm, out_dir, args.timeout)
    elif not tiny:
        raise RuntimeError("the HF Trainer baseline needs accelerate")
    return single_measurements(nat, hf, cfg, args, machine, out_dir)


def annotation_ms(table: str) -> dict[str, float]:
    """Self CUDA milliseconds of the annotation ranges in a ``key_averages().table()`` text
    (pure; unit-tested): used to take them out of runs profiled before they were skipped."""
    import re

    out: dict[str, float] = {}
    for line in table.splitlines():
        cols = re.split(r"\s{2,}", line.strip())
        if len(cols) < 11 or not _is_annotation(cols[0]):
            continue
        m = re.fullmatch(r"([0-9.]+)(us|ms|s)", cols[6])
        if m:
            out[cols[0]] = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    return out


def fix_profile(profile: dict[str, Any], table: str, steps: int) -> dict[str, Any]:
    """Remove annotation ranges that an older summary counted under "other kernels"."""
    if not any(_is_annotation(k["name"]) for k in profile.get("topKernels", [])):
        return profile  # summarised without them already
    ann = annotation_ms(table)
    cats = {k: dict(v) for k, v in profile.get("categories", {}).items()}
    removed = sum(ann.values()) / steps
    if removed and "other kernels" in cats:
        cats["other kernels"]["msPerStep"] -= removed
        total = sum(v["msPerStep"] for v in cats.values())
        for v in cats.values():
            v["share"] = v["msPerStep"] / total
        profile = {
            **profile,
            "categories": cats,
            "gpuMsPerStep": total,
            "topKernels": [
                k for k in profile.get("topKernels", []) if not _is_annotation(k["name"])
            ],
            "annotationMsPerStepRemoved": removed,
        }
    return profile


def single_measurements(
    nat: dict[str, Any],
    hf: dict[str, Any] | None,
    cfg: dict[str, Any],
    args: argparse.Namespace,
    machine: str,
    out_dir: Path,
) -> list[dict[str, Any]]:
    """The measurements of the single-GPU suite from the raw run results (also used to
    re-derive them from a results folder: ``--analyze``)."""
    tiny = args.tiny
    shape = "tiny" if tiny else "llama-3.2-1b"
    seq, every, warm = cfg["seqLen"], cfg["checkpoint"]["everySteps"], args.warmup
    s = summarize_run(nat, warm)
    table = out_dir / "profile-kernels.txt"
    prof = (nat.get("breakdown") or {}).get("profile")
    if prof and table.is_file():
        nat["breakdown"]["profile"] = fix_profile(prof, table.read_text(), 2)
    common_cfg = {
        "model": f"{shape} (random init)",
        "shape": shape_text(shape),
        "params": nat["params"],
        "seqLen": seq,
        "microBatch": cfg["microBatchSize"],
        "gradAccum": cfg["globalBatchSize"] // (cfg["microBatchSize"] * nat.get("worldSize", 1)),
        "precision": cfg["precision"],
        "activationCheckpointing": cfg["activationCheckpointing"],
        "compile": cfg["compile"],
        "attention": "SDPA",
        "torch": nat["torch"],
    }
    bd = nat["breakdown"]
    items = [
        common.measurement(
            "train.native.mfu",
            machine,
            common_cfg,
            "MFU",
            s["mfu"] or 0.0,
            goal=common.goal(">=", 0.50),
            details={
                **s,
                "flopsPerToken": nat["flopsPerToken"],
                "peakFlops": nat["peakFlopsPerDevice"],
                "plannerInput": planner_input(cfg, nat, SHAPES[shape]["hidden_size"]),
            },
        ),
        common.measurement(
            "train.native.step_time",
            machine,
            common_cfg,
            "ms/step",
            bd["stepMs"],
            details={
                k: bd[k]
                for k in (
                    "forwardMs",
                    "backwardMs",
                    "forwardBackwardMs",
                    "optimizerMs",
                    "otherMs",
                    "warmupSeconds",
                )
                if k in bd
            }
            | {
                "profile": bd.get("profile"),
                "method": "CUDA events around each phase of full "
                "steps (median of 3), torch.profiler over 2 more steps",
            },
        ),
        common.measurement(
            "train.native.peak_memory",
            machine,
            common_cfg,
            "GiB",
            nat["memory"].get("peakAllocatedGiB", 0.0),
            details=nat["memory"],
        ),
    ]
    if hf is not None:
        items.insert(
            1,
            common.measurement(
                "train.native.vs_hf_trainer",
                machine,
                common_cfg,
                "tokens/s",
                s["tokensPerSec"],
                baseline=(
                    "transformers Trainer (SDPA, bf16 autocast, fused AdamW)",
                    hf["tokensPerSec"],
                ),
                goal=common.goal(">=", 1.5, "ratio"),
                details={
                    "native": s,
                    "hf": {k: v for k, v in hf.items() if k != "stepSeconds"},
                    "hfStepSeconds": hf.get("stepSeconds"),
                },
            ),
        )
        items.append(
            common.measurement(
                "train.hf_trainer.peak_memory",
                machine,
                common_cfg,
                "GiB",
                hf.get("peakAllocatedGiB", 0.0),
                details={k: hf.get(k) for k in ("peakAllocatedGiB", "peakReservedGiB")},
            )
        )
    items += stall_measurements(
        nat,
        s["medianStepSeconds"],
        machine,
        common_cfg,
        every,
        failed_writes(out_dir / "native-1gpu.log"),
        async_label=getattr(args, "async_label", "async"),
    )
    return items


def suite_scaling(
    args: argparse.Namespace, work: Path, out_dir: Path, machine: str
) -> list[dict[str, Any]]:
    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    shape = "tiny" if tiny else "llama-3.2-1b"
    seq = 128 if tiny else 4096
    carry = prepare_carry()
    data = make_data(work, seq, carry / "tok32k", carry / "corpus")
    model = make_model(work, shape, device)
    results = {}
    for n in (1, 2):
        ckpt = work / f"ckpt-{n}"
        shutil.rmtree(ckpt, ignore_errors=True)
        # The one-GPU run also measures checkpoint stalls (a save with DCP's default staging,
        # then one with the trainer's); its throughput comes from the steps before any save.
        with_ckpt = n == 1 and args.ckpt_steps > 0
        cfg = train_config(
            model_dir=model,
            data_dir=data,
            ckpt_dir=ckpt,
            seq=seq,
            micro=args.micro,
            accum=args.accum,
            world=n,
            steps=args.ckpt_steps if with_ckpt else args.steps,
            every=args.every if with_ckpt else 10**6,
            compile_model=not tiny,
            ac=args.ac,
            device=device,
        )
        extra = ["--breakdown-steps", "0", "--legacy-saves", "1" if with_ckpt else "0"]
        results[n] = (
            cfg,
            launch(
                f"native-{n}gpu",
                cfg,
                n,
                work,
                out_dir,
                extra,
                timeout=args.timeout,
            ),
        )
        shutil.rmtree(ckpt, ignore_errors=True)
    s1 = summarize_run(results[1][1], args.warmup)
    s2 = summarize_run(results[2][1], args.warmup)
    cfg_common = {
        "model": f"{shape} (random init)",
        "seqLen": seq,
        "microBatchPerGpu": args.micro,
        "gradAccum": args.accum,
        "precision": "bf16",
        "compile": not tiny,
        "activationCheckpointing": args.ac,
        "parallelism": "FSDP2 (dp)",
        "torch": results[1][1]["torch"],
    }
    hidden = SHAPES[shape]["hidden_size"]
    stalls = stall_measurements(
        results[1][1],
        s1["medianStepSeconds"],
        machine.replace(": 2x", ": 1 of 2x"),
        {**cfg_common, "gpus": 1},
        args.every,
        failed_writes(out_dir / "native-1gpu.log"),
        prefix="ckpt.stall.h200",
    )
    items = [
        common.measurement(
            "scaling.fsdp2.2gpu",
            machine,
            {**cfg_common, "gpus": 2},
            "tokens/s",
            s2["tokensPerSec"],
            baseline=("same trainer, 1 GPU", s1["tokensPerSec"]),
            goal=common.goal(">=", 1.9, "ratio"),
            details={
                "oneGpu": s1,
                "twoGpu": s2,
                "memory": {"1": results[1][1]["memory"], "2": results[2][1]["memory"]},
            },
        ),
        common.measurement(
            "scaling.fsdp2.1gpu.mfu",
            machine,
            {**cfg_common, "gpus": 1},
            "MFU",
            s1["mfu"] or 0.0,
            details={**s1, "plannerInput": planner_input(results[1][0], results[1][1], hidden)},
        ),
        common.measurement(
            "scaling.fsdp2.2gpu.mfu",
            machine,
            {**cfg_common, "gpus": 2},
            "MFU",
            s2["mfu"] or 0.0,
            details={**s2, "plannerInput": planner_input(results[2][0], results[2][1], hidden)},
        ),
    ]
    return items + stalls


def suite_ckpt(
    args: argparse.Namespace, work: Path, out_dir: Path, machine: str
) -> list[dict[str, Any]]:
    """Checkpoint stalls only: the real train stage saving every ``--every`` steps with the
    trainer's staging (``--legacy-saves`` of them with DCP's default staging first)."""
    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    shape = "tiny" if tiny else "llama-3.2-1b"
    seq = 128 if tiny else 4096
    carry = prepare_carry()
    data = make_data(work, seq, carry / "tok32k", carry / "corpus")
    model = make_model(work, shape, device)
    ckpt = work / "ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    cfg = train_config(
        model_dir=model,
        data_dir=data,
        ckpt_dir=ckpt,
        seq=seq,
        micro=args.micro,
        accum=args.accum,
        world=1,
        steps=args.steps,
        every=args.every,
        compile_model=not tiny,
        ac=args.ac,
        device=device,
    )
    extra = ["--breakdown-steps", "0", "--legacy-saves", str(args.legacy_saves)]
    nat = launch("native-1gpu", cfg, 1, work, out_dir, extra, timeout=args.timeout)
    shutil.rmtree(ckpt, ignore_errors=True)
    s = summarize_run(nat, args.warmup)
    common_cfg = {
        "model": f"{shape} (random init)",
        "seqLen": seq,
        "microBatch": args.micro,
        "gradAccum": args.accum,
        "precision": "bf16",
        "compile": not tiny,
        "activationCheckpointing": args.ac,
        "torch": nat["torch"],
    }
    return stall_measurements(
        nat,
        s["medianStepSeconds"],
        machine,
        common_cfg,
        args.every,
        failed_writes(out_dir / "native-1gpu.log"),
        prefix=f"ckpt.stall.{args.kind or 'gpu'}",
    )


def analyze(args: argparse.Namespace) -> int:
    """Rebuild the results file of a single-GPU run from its raw outputs (no GPU needed)."""
    raw = Path(args.analyze)
    nat = json.loads((raw / "native-1gpu.result.json").read_text())
    hf_path = raw / "hf-trainer.result.json"
    hf = json.loads(hf_path.read_text()) if hf_path.is_file() else None
    cfg = nat.get("config") or train_config(
        model_dir=Path("model"),
        data_dir=Path("data"),
        ckpt_dir=Path("ckpt"),
        seq=4096,
        micro=args.micro,
        accum=args.accum,
        world=1,
        steps=args.steps,
        every=args.every,
        compile_model=True,
        ac=args.ac,
        device="cuda",
    )
    machine = f"{args.kind or 'gpu'}: {nat.get('worldSize', 1)}x {nat['deviceName']}"
    items = single_measurements(nat, hf, cfg, args, machine, raw)
    date = (
        args.date
        or datetime.fromtimestamp((raw / "native-1gpu.result.json").stat().st_mtime, UTC)
        .replace(microsecond=0)
        .isoformat()
    )
    for m in items:
        m["date"] = date
    stem = "train" + (f"-{args.kind}" if args.kind else "")
    path = common.write_results(stem, items, Path(args.results_dir))
    print("wrote", path)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--config", required=True)
    w.add_argument("--result", required=True)
    w.add_argument("--out-dir")
    w.add_argument("--breakdown-warmup", type=int, default=3)
    w.add_argument("--breakdown-steps", type=int, default=0)
    w.add_argument("--profile-steps", type=int, default=0)
    w.add_argument("--legacy-saves", type=int, default=0)
    p.add_argument("--suite", choices=["single", "scaling", "ckpt"], default="single")
    p.add_argument("--legacy-saves", type=int, default=0, help="ckpt suite: DCP-default saves")
    p.add_argument("--kind", default="", help="device kind label for the results file name")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny model")
    p.add_argument("--out", help="also copy results and logs here (e.g. $OUT)")
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--hf-steps", type=int, default=15)
    p.add_argument(
        "--ckpt-steps",
        type=int,
        default=0,
        help="scaling suite: steps of the one-GPU run, which then also saves every --every",
    )
    p.add_argument("--ac", default="none", choices=["none", "selective", "full"])
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--results-dir", default=str(common.RESULTS))
    p.add_argument("--date", help="with --analyze: the run's date (default: the file's mtime)")
    p.add_argument(
        "--async-label",
        default="async",
        help="with --analyze: name of the trainer staging the run used (runs of an earlier "
        "staging get their own name and no goal)",
    )
    p.add_argument(
        "--analyze",
        metavar="DIR",
        help="re-derive the measurements from a finished run's raw results in DIR",
    )
    args = p.parse_args(argv)
    if args.cmd == "worker":
        return worker(args)
    if args.analyze:
        return analyze(args)
    work = common.WORK / ("gpu-tiny" if args.tiny else "gpu")
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out) if args.out else work / "logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        machine = common.cpu_machine() + " (harness smoke test, not a benchmark)"
    else:
        import torch

        n = torch.cuda.device_count()
        machine = f"{args.kind or 'gpu'}: {n}x {torch.cuda.get_device_name(0)}"
    fn = {"single": suite_single, "scaling": suite_scaling, "ckpt": suite_ckpt}[args.suite]
    items = fn(args, work, out_dir, machine)
    stem = {"single": "train", "scaling": "scaling", "ckpt": "ckpt-stall"}[args.suite] + (
        f"-{args.kind}" if args.kind else ""
    )
    write_and_print(stem, items, args, work)
    return 0


def write_and_print(
    stem: str, items: list[dict[str, Any]], args: argparse.Namespace, work: Path
) -> Path:
    """Write the results file (a ``--tiny`` smoke run's beside its work files, not among the
    benchmark results), copy it to ``--out`` and print one line per measurement."""
    results_dir = Path(args.results_dir)
    if args.tiny:
        stem += "-tiny"
        if results_dir == common.RESULTS:
            results_dir = work  # a smoke test is not a benchmark result
    path = common.write_results(stem, items, results_dir)
    if args.out:
        shutil.copy(path, Path(args.out) / path.name)
    for m in items:
        r = m.get("ratio")
        print(
            f"{m['name']:44s} {m['value']:12.4g} {m['metric']:10s}"
            + (f" ratio {r:.2f}" if r is not None else "")
        )
    return path


if __name__ == "__main__":
    sys.exit(main())
