"""The attention and loss kernels of the 1B step, each alone, forward + backward.

Why: the step's kernel table names attention (~92 ms of a 524 ms step) and the head + loss as
the parts a different kernel could shorten. This times the candidates on the step's own shapes
(Llama-3.2-1B, micro batch 8 x 4096 tokens) so a lever is tried in the trainer only where its
kernel is faster:

* attention: SDPA with K/V repeated to the query heads (what the trainer does), SDPA with
  ``enable_gqa=True`` (no repeat), each under the cuDNN and the flash backend;
* head + loss: the trainer's chunked fused loss (``native/loss.py``), the plain head
  (bf16 logits, fp32 cross entropy), and Apple's cut-cross-entropy where it is installed.

``python bench/kernel_bench.py --kind h100 --out DIR`` writes ``kernels-KIND.json``; a variant
that fails (backend not available for the shape, package missing) is a row with its error.
``--tiny`` runs small shapes on CPU (a smoke test of the harness).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common


def _timer(device: str) -> Callable[[Callable[[], Any], int], float]:
    import torch

    def run(fn: Callable[[], Any], reps: int) -> float:
        """Median milliseconds of ``fn`` over ``reps`` timed calls after two warm-ups."""
        for _ in range(2):
            fn()
        times = []
        for _ in range(reps):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
        return sorted(times)[len(times) // 2]

    return run


def attention_cases(
    bsz: int, seq: int, heads: int, kv: int, hd: int, device: str
) -> dict[str, Callable[[], Any]]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dt = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(bsz, heads, seq, hd, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(bsz, kv, seq, hd, device=device, dtype=dt, requires_grad=True)
    v = torch.randn(bsz, kv, seq, hd, device=device, dtype=dt, requires_grad=True)
    grad = torch.randn(bsz, heads, seq, hd, device=device, dtype=dt)
    groups = heads // kv

    def repeat() -> Any:
        kk = k.repeat_interleave(groups, dim=1)
        vv = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)

    def gqa() -> Any:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    backends = (
        {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
        if device == "cuda"
        else {"math": SDPBackend.MATH}
    )
    cases: dict[str, Callable[[], Any]] = {}
    for bname, backend in backends.items():
        for fname, f in (("repeat-kv", repeat), ("enable-gqa", gqa)):

            def case(f: Callable[[], Any] = f, backend: Any = backend) -> Any:
                with sdpa_kernel([backend]):
                    out = f()
                out.backward(grad)
                q.grad = k.grad = v.grad = None

            cases[f"attention.{bname}.{fname}"] = case
    return cases


def loss_cases(tokens: int, hidden: int, vocab: int, device: str) -> dict[str, Callable[[], Any]]:
    import torch
    import torch.nn.functional as F

    common.bootstrap()
    from cpt_training.native.loss import chunked_linear_cross_entropy

    dt = torch.bfloat16 if device == "cuda" else torch.float32
    h = torch.randn(tokens, hidden, device=device, dtype=dt, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device, dtype=dt) * 0.02).requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,), device=device)
    compiled = device == "cuda"

    def ours() -> None:
        chunked_linear_cross_entropy(h[None], w, t[None], compiled=compiled).backward()
        h.grad = w.grad = None

    def plain() -> None:
        logits = h @ w.t()
        F.cross_entropy(logits.float(), t, reduction="sum").backward()
        h.grad = w.grad = None

    cases: dict[str, Callable[[], Any]] = {
        "loss.cpt-chunked-fused": ours,
        "loss.plain-head": plain,
    }
    try:
        from cut_cross_entropy import linear_cross_entropy  # type: ignore[import-not-found]
    except ImportError as exc:
        err = str(exc)

        def missing() -> None:
            raise RuntimeError(f"cut-cross-entropy not installed: {err}")

        cases["loss.cut-cross-entropy"] = missing
    else:

        def cce() -> None:
            linear_cross_entropy(h, w, t, reduction="sum").backward()
            h.grad = w.grad = None

        cases["loss.cut-cross-entropy"] = cce
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="gpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--layers", type=int, default=16, help="attention calls per step")
    p.add_argument("--out", help="also copy the results file here")
    args = p.parse_args(argv)
    import torch

    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        shapes = dict(bsz=1, seq=64, heads=4, kv=2, hd=16, tokens=64, hidden=32, vocab=256)
        machine = common.cpu_machine() + " (harness smoke test, not a benchmark)"
    else:
        shapes = dict(bsz=8, seq=4096, heads=32, kv=8, hd=64, tokens=32768, hidden=2048)
        shapes["vocab"] = 128256
        machine = f"{args.kind}: 1x {torch.cuda.get_device_name(0)}"
    timer = _timer(device)
    cases = attention_cases(
        shapes["bsz"], shapes["seq"], shapes["heads"], shapes["kv"], shapes["hd"], device
    )
    cases.update(loss_cases(shapes["tokens"], shapes["hidden"], shapes["vocab"], device))
    items = []
    for name, fn in cases.items():
        per_step = args.layers if name.startswith("attention.") else 1
        try:
            ms = timer(fn, args.reps)
            details: dict[str, Any] = {"msPerCall": ms, "callsPerStep": per_step}
            print(f"{name:36s} {ms:8.2f} ms/call, {ms * per_step:8.1f} ms/step", flush=True)
        except Exception as exc:  # a failing kernel is a result row
            ms = 0.0
            details = {"failed": f"{type(exc).__name__}: {str(exc)[-800:]}"}
            print(f"{name:36s} failed: {details['failed'][:200]}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        items.append(
            common.measurement(
                f"kernels.{name}",
                machine,
                {**shapes, "torch": torch.__version__, "card": machine},
                "ms/step",
                ms * per_step,
                details=details,
            )
        )
    stem = f"kernels-{args.kind}" + ("-tiny" if args.tiny else "")
    results = common.WORK if args.tiny else common.RESULTS
    path = common.write_results(stem, items, results)
    if args.out:
        import shutil

        shutil.copy(path, Path(args.out) / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
