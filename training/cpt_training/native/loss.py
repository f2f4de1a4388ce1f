"""LM head + cross entropy in token chunks, with the gradients computed in the forward pass.

Why: the plain head (``lm_head(h)`` then ``cross_entropy(logits.float())``) keeps the whole
``[tokens, vocab]`` logits tensor alive from forward to backward and builds its fp32 copy and
its gradient besides: for Llama-3's 128,256-token vocabulary and 8,192 tokens a micro batch that
is 2 GiB of bf16 logits, 4 GiB of fp32 and another 2 GiB of gradient, which is what stops a
larger micro batch from fitting. Here the tokens go through the head ``CHUNK_TOKENS`` at a time:
each chunk's logits are made, reduced to their summed loss and turned straight into
``d loss / d logits`` (softmax minus one-hot), which is multiplied into the gradients of the
hidden states and of the head weight right away; only those two gradients (the size of the
inputs) are kept for backward, which scales them by the incoming gradient. The matmul work is
the same as the plain head's (one forward and two backward products); the elementwise work is
one fused pass per chunk (``_chunk_loss_and_grad``, compiled).

Numerics: logits are bf16 products (as in the plain head), the softmax and the loss are fp32,
and the weight gradient is accumulated over chunks by ``addmm`` (fp32 accumulation inside each
product, one bf16 rounding per chunk). ``tests/unit/test_native_loss.py`` checks loss and
gradients against ``F.cross_entropy`` on random inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

IGNORE_INDEX = -100

CHUNK_TOKENS = 4096
"""Tokens per chunk: 1 GiB of bf16 logits for a 128k vocabulary, large enough for the products
to run at full rate (each is 4096 x hidden x vocab)."""


def _chunk_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross entropy of one chunk (fp32) and its gradient w.r.t. the logits (in the
    logits' dtype); ignored targets contribute neither."""
    x = logits.float()
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
    probs = torch.exp(x - lse.unsqueeze(1))
    # A broadcast comparison, not one_hot: it fuses into the same pass instead of
    # materialising an int64 [tokens, vocab] tensor.
    cols = torch.arange(x.shape[1], device=x.device)
    onehot = (cols.unsqueeze(0) == safe.unsqueeze(1)).to(x.dtype)
    grad = (probs - onehot) * valid.unsqueeze(1).to(x.dtype)
    return loss, grad.to(logits.dtype)


_compiled: dict[str, Callable[..., Any]] = {}


def _kernel(compiled: bool) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    if not compiled:
        return _chunk_loss_and_grad
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled["fn"]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        compiled: bool,
    ) -> torch.Tensor:
        kernel = _kernel(compiled)
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if needs_h else None
        grad_w = torch.zeros_like(weight) if needs_w else None
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            logits = h @ weight.t()
            part, g = kernel(logits, targets[start : start + chunk])
            del logits
            loss += part
            if grad_h is not None:
                torch.mm(g, weight, out=grad_h[start : start + chunk])
            if grad_w is not None:
                grad_w.addmm_(g.t(), h)
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w if grad_w is not None else torch.empty(0),
        )
        ctx.has = (grad_h is not None, grad_w is not None)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        has_h, has_w = ctx.has
        # A 0-dim fp32 factor: the product is computed in fp32 and rounded once.
        return (
            grad_h * grad_out if has_h else None,
            grad_w * grad_out if has_w else None,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int = CHUNK_TOKENS,
    compiled: bool = False,
) -> torch.Tensor:
    """Summed cross entropy of ``hidden @ weight.T`` against ``targets`` (``IGNORE_INDEX``
    skipped), as ``F.cross_entropy(logits.float(), targets, reduction="sum")`` would give,
    without the full logits. ``hidden``: ``[..., H]``; ``weight``: ``[V, H]``; ``targets``:
    ``[...]``. ``compiled`` fuses each chunk's softmax/loss/gradient into one pass."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows but {t.shape[0]} targets")
    out: torch.Tensor = _ChunkedLinearCrossEntropy.apply(h, weight, t, chunk, compiled)
    return out
