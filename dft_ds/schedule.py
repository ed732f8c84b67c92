"""The learning-rate schedule: linear warmup, then cosine down to a floor."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(total_steps: int, warmup_ratio: float, min_ratio: float):
    """DeepSpeed's `lr_scheduler` argument: optimizer -> a LambdaLR of cosine_with_warmup. (The factor
    is a plain function, so checkpoints hold the scheduler's step and base rates, never its settings:
    a resume computes the schedule from the run's own.)"""
    warmup = int(warmup_ratio * total_steps)

    def scheduler(optimizer):
        import torch

        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup, min_ratio))

    return scheduler
