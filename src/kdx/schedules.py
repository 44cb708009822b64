"""Learning-rate schedules that torch does not ship (``optim.scheduler._target_`` names them)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_epochs: float, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """KDA's schedule (official ``main_kda.py``), per iteration: ``lr·max(1, it)/W`` for the first
    ``W = total_steps·warmup_epochs/epochs`` iterations, then a cosine from lr to 0 over the rest.
    ``total_steps`` is filled from the run's length by the module; ``conf/optim/sgd_kda.yaml`` sets
    ``warmup_epochs: ${method.warm}``, so the warm-up lasts as long as the KDA term is held back."""
    if epochs < 1 or total_steps < 1 or warmup_epochs < 0:
        raise ValueError(
            f"warmup_cosine: epochs={epochs}, total_steps={total_steps} must be >= 1 and "
            f"warmup_epochs={warmup_epochs} >= 0"
        )
    warm = int(round(total_steps * min(warmup_epochs, epochs) / epochs))

    def factor(it: int) -> float:
        if it < warm:
            return max(1, it) / warm
        span = max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (it - warm) / span)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
