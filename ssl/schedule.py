"""Learning-rate schedules as pure functions of the global step."""
from __future__ import annotations

import math


def cosine_lr(step: int, *, total_steps: int, base_lr: float, warmup_steps: int = 0, final_lr: float = 0.0) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def poly_lr(step: int, *, total_steps: int, base_lr: float, power: float = 0.9) -> float:
    return base_lr * (1.0 - min(step, total_steps) / max(1, total_steps)) ** power
