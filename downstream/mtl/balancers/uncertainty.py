"""Uncertainty weighting (Kendall et al. 2018): a learned ``s_t = log σ_t²`` per task.

Regression tasks (depth, normals): ``½ exp(−s) L + ½ s``; classification tasks (semseg, human_parts, sal,
edge): ``exp(−s) L + ½ s``. ``s`` starts at 0 and is trained by the run's optimizer (no weight decay); its
gradient is averaged over ranks, so every rank keeps the same weights. Weight ``λ_t = c_t exp(−s_t)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..components import BALANCERS
from .base import Balancer, SharedParts, all_reduce_grads_

REGRESSION_TASKS = ("depth", "normals")


@BALANCERS.register("uncertainty")
class Uncertainty(Balancer):
    def __init__(self, tasks: Sequence[str], init_log_var: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init_log_var)))
        self.register_buffer("scale", torch.tensor([0.5 if t in REGRESSION_TASKS else 1.0 for t in self.tasks]))

    def combine(self, losses: torch.Tensor, *, step: int, epoch: int, kpi: Optional[torch.Tensor] = None) -> torch.Tensor:
        precision = self.scale * torch.exp(-self.log_vars)  # [T]
        self.lambdas.copy_(precision.detach())
        return (precision * losses).sum() + 0.5 * self.log_vars.sum()

    def backward(self, losses, *, extra=0.0, shared: Optional[SharedParts] = None, step: int = 0, epoch: int = 0,
                 kpi=None) -> torch.Tensor:
        total = super().backward(losses, extra=extra, shared=shared, step=step, epoch=epoch, kpi=kpi)
        all_reduce_grads_([self.log_vars])  # the log σ² are outside DDP: average their gradient here
        return total
