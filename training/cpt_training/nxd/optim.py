"""AdamW with fp32 moments for bf16 weights (the nxd backend without ZeRO-1).

NxD refuses master weights without ZeRO-1, so bf16 weights are updated in place. Plain
``torch.optim.AdamW`` would then keep its moments in bf16, whose 8-bit mantissa loses the
second moment's small increments. NxD's examples use ``AdamW_FP32OptimParams`` here, which
keeps fp32 moments only under ``XLA_DOWNCAST_BF16=1`` (it stores them as float64, which that
variable maps to fp32 on the device); cpt does not set that variable (docs/nxd.md, Precision
recipe), so this optimizer upcasts explicitly: gradient and weight are read as fp32, the
moments are fp32, and only the final write is bf16. The Neuron runtime's stochastic rounding
(on for this case) makes that write unbiased.

The update is torch's AdamW (decoupled decay applied before the Adam step, bias-corrected
moments), so a run switching between this and ``torch.optim.AdamW`` on fp32 weights follows
the same math.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from cpt_training.nxd.precision import PrecisionRecipe


class AdamWFP32States(Optimizer):
    """AdamW whose moments and arithmetic are fp32 whatever the parameter dtype."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @staticmethod
    def for_recipe(rec: PrecisionRecipe) -> type[Optimizer]:
        """The optimizer class a precision recipe names: this one for bf16 weights updated
        in place, torch's AdamW otherwise (inside NxD's ZeRO-1 wrapper when ZeRO-1 runs)."""
        if rec.optimizer == "adamw-fp32-states":
            return AdamWFP32States
        return torch.optim.AdamW

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._update(p, lr=lr, beta1=beta1, beta2=beta2, eps=eps, decay=decay)
        return loss

    def _update(
        self, p: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float, decay: float
    ) -> None:
        grad = p.grad
        assert grad is not None
        if grad.is_sparse:
            raise RuntimeError("AdamWFP32States does not support sparse gradients")
        g = grad.to(torch.float32)
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        state["step"] += 1
        step = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        w = p.to(torch.float32)
        if decay:
            w.mul_(1.0 - lr * decay)
        step_size = lr / (1.0 - beta1**step)
        denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)
        p.copy_(w)
