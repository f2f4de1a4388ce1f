"""Learning-rate schedule shared by the trainers: linear warmup, constant hold, then decay.

This is the schedule of the seed recipe (NxD's Llama pretraining: ``lr``, ``min_lr``,
``warmup_steps``, ``constant_steps``, cosine decay to ``min_lr`` at ``max_steps``). It is a pure
function of the optimizer-step index, so resuming needs no scheduler state beyond the step count
and every backend gets the same curve.

Step indexing: ``step`` is the number of optimizer updates already applied (0 for the first
update). The rate used by update ``step`` is::

    warmup   (step < W):            s + (lr - s) * (step + 1) / W,  s = warmup_start_lr
    hold     (W <= step < W + C):   lr
    decay    (W + C <= step):       p = min(1, (step - W - C + 1) / D),  D = max_steps - W - C
                 cosine:   min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2
                 linear:   lr - (lr - min_lr) * p
                 constant: lr
                 wsd:      C = max(0, max_steps - W - K), K = max(1, round(f * max_steps)),
                           then linear (f = cooldown_fraction)

Continual pretraining (Ibrahim et al. 2024) re-warms a pretrained model: ``warmup_start_lr``
starts the warmup line at a non-zero rate (say the previous run's ``min_lr``) instead of 0, and
``wsd`` (warmup-stable-decay) keeps the peak until a short final cooldown, so a run can be
extended from a plateau checkpoint without re-decaying what came before.

so the first update never uses a zero rate, and the last update (``step = max_steps - 1``) uses
exactly ``min_lr`` (p = 1). Steps past ``max_steps`` keep the last rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from cpt_training.config import OptimizerConfig

DecayStyle = Literal["cosine", "linear", "constant", "wsd"]


@dataclass(frozen=True, slots=True)
class LrSchedule:
    """The schedule's parameters; call it with a step index to get the rate."""

    lr: float
    min_lr: float
    warmup_steps: int
    constant_steps: int
    max_steps: int
    decay_style: DecayStyle = "cosine"
    cooldown_fraction: float = 0.2
    warmup_start_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"maxSteps must be >= 1, got {self.max_steps}")
        if self.warmup_steps < 0 or self.constant_steps < 0:
            raise ValueError("warmupSteps and constantSteps must be >= 0")
        if self.min_lr > self.lr:
            raise ValueError(f"minLr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.decay_style not in ("cosine", "linear", "constant", "wsd"):
            raise ValueError(
                f"decayStyle must be one of cosine, linear, constant, wsd; got {self.decay_style!r}"
            )
        if not 0 < self.cooldown_fraction <= 1:
            raise ValueError(f"cooldownFraction must be in (0, 1], got {self.cooldown_fraction}")
        if not 0 <= self.warmup_start_lr <= self.lr:
            raise ValueError(f"warmupStartLr must be in [0, lr], got {self.warmup_start_lr}")

    @classmethod
    def from_config(cls, opt: OptimizerConfig, max_steps: int) -> LrSchedule:
        return cls(
            lr=opt.lr,
            min_lr=opt.min_lr,
            warmup_steps=opt.warmup_steps,
            constant_steps=opt.constant_steps,
            max_steps=max_steps,
            decay_style=opt.decay_style,
            cooldown_fraction=opt.cooldown_fraction,
            warmup_start_lr=opt.warmup_start_lr,
        )

    @property
    def hold_steps(self) -> int:
        """Steps at the peak after warmup: constant_steps, or for wsd all but the cooldown."""
        if self.decay_style != "wsd":
            return self.constant_steps
        cooldown = max(1, round(self.cooldown_fraction * self.max_steps))
        return max(0, self.max_steps - self.warmup_steps - cooldown)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        w, c = self.warmup_steps, self.hold_steps
        if step < w:
            return self.warmup_start_lr + (self.lr - self.warmup_start_lr) * (step + 1) / w
        if step < w + c or self.decay_style == "constant":
            return self.lr
        decay_steps = self.max_steps - w - c
        if decay_steps <= 0:
            # Warmup + hold cover the whole run: nothing left to decay over.
            return self.lr
        progress = min(1.0, (step - w - c + 1) / decay_steps)
        if self.decay_style in ("linear", "wsd"):
            return self.lr - (self.lr - self.min_lr) * progress
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
