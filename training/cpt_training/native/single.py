"""One device without FSDP: fp32 master weights, bf16 compute copies, fp32 gradient sums.

Why: on one GPU, FSDP2 has nothing to shard, yet it still all-gathers (copies) and casts every
block's weights to bf16 for each micro batch, chunks and concatenates the gradients, and runs
its hooks around every block; measured on one H100 that was about 36 ms of a 560 ms step plus
idle gaps. Here the module keeps its fp32 parameters (the optimizer's master weights, the
checkpoint's state: nothing about checkpoints changes, and a checkpoint resumes on any number
of devices), and forward/backward run through ``torch.func.functional_call`` on bf16 copies of
them that are made once per optimizer step (after ``optimizer.step``), not once per micro
batch. Each micro batch's bf16 gradients are added into the fp32 master gradients (the same fp32
accumulation FSDP2's mixed-precision policy does), so the optimizer and the gradient clip see
exactly what they saw under FSDP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call


class MasterWeights:
    """bf16 compute copies of ``model``'s parameters (tied ones once) and the gradient plumbing
    between them. ``refresh()`` must run after the fp32 weights change (load, optimizer step)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.masters = [p for _, p in named]
        self.dtype = dtype
        self.compute: list[torch.Tensor] = []

    def refresh(self) -> None:
        """Copy the fp32 weights into the compute copies (allocated on first use, after the
        module's storage exists on its device)."""
        with torch.no_grad():
            if not self.compute or self.compute[0].device != self.masters[0].device:
                self.compute = [
                    p.detach().to(self.dtype).requires_grad_(True) for p in self.masters
                ]
            else:
                torch._foreach_copy_(self.compute, [p.detach() for p in self.masters])

    def __call__(self, *args: Any) -> Any:
        """The module's forward on the compute copies (tied parameters stay tied)."""
        if not self.compute:
            raise RuntimeError("MasterWeights.refresh() must run before the first forward")
        params = dict(zip(self.names, self.compute, strict=True))
        return functional_call(self.model, params, args, tie_weights=True, strict=False)

    def accumulate(self) -> None:
        """Add the compute copies' gradients of the last backward into the fp32 ``.grad`` of
        the master weights, and free them."""
        with torch.no_grad():
            pending = [
                (m, c)
                for m, c in zip(self.masters, self.compute, strict=True)
                if c.grad is not None
            ]
            fresh = [(m, c) for m, c in pending if m.grad is None]
            summed = [(m, c) for m, c in pending if m.grad is not None]
            for m, c in fresh:
                assert c.grad is not None
                m.grad = c.grad.to(m.dtype)
            if summed:
                torch._foreach_add_(
                    [m.grad for m, _ in summed],  # type: ignore[misc]
                    [c.grad for _, c in summed],  # type: ignore[misc]
                )
            for _, c in pending:
                c.grad = None
