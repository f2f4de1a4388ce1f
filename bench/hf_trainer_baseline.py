"""The baseline of goal 1: transformers' ``Trainer`` on the same model, batch and precision.

``LlamaForCausalLM`` (``--attn``: ``sdpa`` by default) loaded from the same model dir as the
native run (fp32 weights, ``bf16=True`` autocast: mixed precision with fp32 master weights, as
the native trainer's), the same micro batch, gradient accumulation and gradient clipping; any
``TrainingArguments`` field can be set with ``--targ KEY=VALUE`` (``torch_compile=true``,
``use_liger_kernel=true``, ``optim=adamw_torch_fused``...) and the result records every
argument that was set, a synthetic dataset of random token blocks (input_ids = labels, no
attention mask, so SDPA runs its causal path). A callback synchronises the GPU at every step end
and records the step times; tokens/s is taken over the steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--result", required=True)
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, ...)")
    p.add_argument(
        "--targ",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainingArguments field (VALUE as JSON, else a string); repeatable",
    )
    args = p.parse_args(argv)
    overrides = dict(_targ(t) for t in args.targ)

    import torch
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    model = LlamaForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation=args.attn
    )
    vocab = int(model.config.vocab_size)
    n_blocks = args.micro * args.accum * (args.steps + 1)

    class Blocks(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.data = torch.randint(0, min(vocab, 32000), (n_blocks, args.seq), generator=g)

        def __len__(self) -> int:
            return int(n_blocks)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.data[i], "labels": self.data[i]}

    times: list[float] = []

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.t0 = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            if len(times) == args.warmup and cuda:
                torch.cuda.reset_peak_memory_stats()

    with tempfile.TemporaryDirectory(prefix="hf-trainer-") as tmp:
        kwargs: dict[str, Any] = {
            "per_device_train_batch_size": args.micro,
            "gradient_accumulation_steps": args.accum,
            "max_steps": args.steps,
            "learning_rate": 3e-4,
            "weight_decay": 0.1,
            "adam_beta2": 0.95,
            "max_grad_norm": 1.0,
            "warmup_steps": 5,
            "bf16": cuda,
            "optim": "adamw_torch_fused" if cuda else "adamw_torch",
            "logging_steps": 10**6,
            "save_strategy": "no",
            "report_to": [],
            "dataloader_num_workers": 2,
            "dataloader_pin_memory": cuda,
            "disable_tqdm": True,
            "use_cpu": not cuda,
        }
        kwargs.update(overrides)
        targs = TrainingArguments(output_dir=tmp, **kwargs)
        trainer = Trainer(model=model, args=targs, train_dataset=Blocks(), callbacks=[StepTimer()])
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0

    steady = times[args.warmup :]
    if not steady:
        raise SystemExit("no steps after warm-up: raise --steps")
    med = common.median(steady)
    tokens_per_step = args.micro * args.accum * args.seq
    out = {
        "tokensPerSec": tokens_per_step / med,
        "medianStepSeconds": med,
        "stepTimeCv": common.cv(steady),
        "steadySteps": len(steady),
        "stepSeconds": times,
        "wallSeconds": wall,
        "tokensPerStep": tokens_per_step,
        "attnImplementation": str(model.config._attn_implementation),
        "trainingArguments": kwargs,
        "microBatch": args.micro,
        "gradAccum": args.accum,
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    if cuda:
        out["peakAllocatedGiB"] = torch.cuda.max_memory_allocated() / 2**30
        out["peakReservedGiB"] = torch.cuda.max_memory_reserved() / 2**30
    Path(args.result).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("tokensPerSec", "medianStepSeconds")}))
    return 0


def _targ(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise SystemExit(f"--targ {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


if __name__ == "__main__":
    sys.exit(main())
