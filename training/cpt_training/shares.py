"""Sources' shares of a window of sample positions: the apportionment both the trainer
(``cpt_training.mixture``) and ``cpt plan`` use. Free of numpy, which the operator image
does not install.
"""

from __future__ import annotations

from collections.abc import Sequence

WINDOW = 4096
"""Positions per window; also the finest weight resolution (a share below 1/WINDOW is an
error rather than silently zero)."""


class MixtureError(ValueError):
    """The weights cannot be honoured with these sources; the message says which and why."""


def quotas(weights: Sequence[float], window: int = WINDOW) -> list[int]:
    """Positions per window of every source: ``window`` apportioned by ``weights`` with
    the largest remainders (ties to the lower index), so they sum to ``window`` exactly."""
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise MixtureError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    exact = [window * w / total for w in weights]
    q = [int(x) for x in exact]
    order = sorted(range(len(q)), key=lambda i: (-(exact[i] - q[i]), i))
    for i in order[: window - sum(q)]:
        q[i] += 1
    return q
