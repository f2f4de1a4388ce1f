"""Float8 training of the blocks' linear layers through torchao (``float8: true`` in the spec).

Why torchao: its ``Float8Linear`` keeps the module's ``weight`` parameter (fp32 master, bf16
compute copy) and casts to float8 only inside the matmuls, with dynamic tensorwise scales, so
checkpoints, the optimizer, FSDP2 and the export to transformers are unchanged; a float8 run
resumes as bf16 and back. Only the decoder blocks' projections are converted: the LM head
(tied to the embedding in small Llamas, and run by the fused loss) and any matrix whose sides
are not multiples of 16 (the float8 GEMM's alignment) stay bf16.

Float8 needs an NVIDIA GPU of compute capability 8.9 or newer (H100, L4, ...) and the
``torchao`` package; both are checked before the model is built, with the fix in the error.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

MIN_CAPABILITY = (8, 9)


def convertible(module: nn.Module, fqn: str) -> bool:
    """Whether the linear layer at ``fqn`` trains in float8: block projections only, both
    sides multiples of 16."""
    if not isinstance(module, nn.Linear) or ".layers." not in f".{fqn}":
        return False
    out_f, in_f = module.weight.shape
    return out_f % 16 == 0 and in_f % 16 == 0


def float8_problem(device_type: str, device: torch.device | None = None) -> str | None:
    """Why float8 training cannot run here (the text names the field and the fix), or None."""
    if device_type != "cuda":
        return (
            f"training.float8: float8 matmuls need an NVIDIA GPU (compute capability >= 8.9), "
            f"this run's device is {device_type!r}; set float8: false"
        )
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (
            f"training.float8: this GPU has compute capability {cap[0]}.{cap[1]}, float8 "
            "matmuls need 8.9 or newer (H100, H200, L4, ...); set float8: false"
        )
    if importlib.util.find_spec("torchao") is None:
        return (
            "training.float8: the torchao package is not installed in the training image; "
            "use the cpt-trainer-cuda image (it has the float8 extra) or pip install "
            "'cpt[float8]', or set float8: false"
        )
    return None


def convert_to_float8(model: nn.Module) -> int:
    """Swap the convertible linear layers of ``model`` (it may be on the meta device) for
    torchao's ``Float8Linear`` in place; returns how many were converted."""
    from torchao.float8 import (  # type: ignore[import-untyped]
        Float8LinearConfig,
        convert_to_float8_training,
    )

    seen: list[str] = []

    def keep(module: nn.Module, fqn: str) -> bool:
        ok = convertible(module, fqn)
        if ok:
            seen.append(fqn)
        return ok

    config: Any = Float8LinearConfig()
    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    return len(seen)
