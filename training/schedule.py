"""The reference's learning-rate schedule: linear warm-up of a multiplier, then step decay.

The reference (``lavse/train/optimizers.py``, ``BanOptimizer``, from BAN-VQA) sets, after ``n``
optimiser steps, ``lr = base * linspace(0.5, 2.0, W)[n]`` while ``n < W``, and afterwards multiplies
the lr by 0.25 whenever ``n`` is in ``range(10000, 20000, 3000)`` (Flickr30k; COCO: ``W`` = 16000,
``range(40000, 80000, 8000)``). :class:`WarmupStepSchedule` is that, as a pure function of the
iteration, so its whole state is the iteration counter that the training state saves anyway.

Deviation, on purpose: the reference's very first step runs at the unscaled ``base`` lr (it only
sets the lr after a step); here step 0 runs at ``0.5 * base`` like the rest of the warm-up ramp.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class WarmupStepSchedule:
    """Learning rate of step ``n`` (0-based: ``n`` steps were taken before it).

    Attributes:
        lr: base learning rate.
        warmup_start, warmup_end: the multiplier ramps linearly from ``warmup_start`` (step 0) to
            ``warmup_end`` (step ``warmup_iterations - 1``) and stays there.
        warmup_iterations: length of the ramp (0: start at ``warmup_end``).
        decay_at: steps from which the lr is multiplied by ``decay_factor`` once more.
        decay_factor: 0.25 in the reference.
    """

    lr: float
    warmup_start: float = 0.5
    warmup_end: float = 2.0
    warmup_iterations: int = 4000
    decay_at: tuple[int, ...] = field(default=(10000, 13000, 16000, 19000))
    decay_factor: float = 0.25

    def multiplier(self, n: int) -> float:
        """The factor on ``lr`` at step ``n``."""
        if n < self.warmup_iterations:
            # torch.linspace(start, end, W)[n], as the reference builds its warm-up table.
            fraction = n / (self.warmup_iterations - 1) if self.warmup_iterations > 1 else 1.0
            return self.warmup_start + (self.warmup_end - self.warmup_start) * fraction
        return self.warmup_end * self.decay_factor ** bisect_right(sorted(self.decay_at), n)

    def lr_at(self, n: int) -> float:
        """The learning rate of step ``n``."""
        return self.lr * self.multiplier(n)

    def apply(self, optimizer: torch.optim.Optimizer, n: int) -> float:
        """Set every parameter group's lr for step ``n``; returns it."""
        lr = self.lr_at(n)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
