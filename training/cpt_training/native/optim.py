"""AdamW construction and global-norm gradient clipping for sharded parameters."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from cpt_training.config import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on matrices (linear and embedding weights) only: decaying norm gains and
    biases pulls them towards 0, which is not regularisation but damage."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for _name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups: list[dict[str, object]] = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(model: nn.Module, opt: OptimizerConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) on CUDA and CPU, foreach elsewhere."""
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, opt.weight_decay),
        lr=opt.lr,
        betas=(opt.beta1, opt.beta2),
        eps=opt.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _grad_groups(params: Iterable[nn.Parameter]) -> list[list[torch.Tensor]]:
    """Gradients grouped so that each group lives on one mesh with one placement (foreach
    kernels and DTensor ops cannot mix meshes: TP'd block weights are 2-D DTensors, the
    replicated embeddings 1-D ones)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else g.device
        groups.setdefault(key, []).append(g)
    return list(groups.values())


def grad_norm(groups: list[list[torch.Tensor]]) -> torch.Tensor:
    """The global L2 norm of all gradients, as a 0-dim tensor on the device (no host sync):
    one small collective per mesh group, then the groups' squares are summed."""
    squares = []
    for grads in groups:
        n = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        squares.append(n.float() ** 2)
    if not squares:
        return torch.zeros(())
    return torch.stack(squares).sum().sqrt()


def clip_grads(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm`` (0 disables clipping);
    returns the norm before clipping."""
    groups = _grad_groups(params)
    total = grad_norm(groups)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grads in groups:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total
