"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): a learned ``s_t = log σ_t²`` per task.

``convention``:

- ``paper`` (default): the paper's Eq. 7/10 — regression tasks (depth, normals) ``1/(2σ²) L + log σ``
  = ``½ e^{−s} L + ½ s``; classification tasks (semseg, human_parts, sal, edge) ``1/σ² L + log σ``
  = ``e^{−s} L + ½ s``. ``s`` starts at ``init_log_var`` (default 0, σ = 1; the paper gives no initialisation).
- ``libmtl``: LibMTL's ``UW`` and lorenmt/mtan's (and the CAGrad repository's) ``1/(2σ²) L + log σ`` for *every*
  task, ``s`` initialised at −0.5 (unless ``init_log_var`` is given): the classification tasks get half the
  paper's weight. The convention of the tables of LibMTL and of Liu et al.'s MTAN/CAGrad papers.

``s`` is trained by the run's optimizer (no weight decay); its gradient is averaged over ranks, so every rank
keeps the same weights. Reported weight ``λ_t = c_t e^{−s_t}`` (``c_t`` = ½ or 1).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..components import BALANCERS
from .base import Balancer, SharedParts, all_reduce_grads_

REGRESSION_TASKS = ("depth", "normals")
CONVENTIONS = ("paper", "libmtl")
INIT_LOG_VAR = {"paper": 0.0, "libmtl": -0.5}


@BALANCERS.register("uncertainty")
class Uncertainty(Balancer):
    def __init__(self, tasks: Sequence[str], init_log_var: Optional[float] = None, convention: str = "paper") -> None:
        super().__init__(tasks)
        if convention not in CONVENTIONS:
            raise ValueError(f"uncertainty convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
        self.convention = convention
        init = INIT_LOG_VAR[convention] if init_log_var is None else float(init_log_var)
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), init))
        factors = [0.5 if convention == "libmtl" or t in REGRESSION_TASKS else 1.0 for t in self.tasks]
        self.register_buffer("scale", torch.tensor(factors))

    def combine(self, losses: torch.Tensor, *, step: int, epoch: int, kpi: Optional[torch.Tensor] = None) -> torch.Tensor:
        precision = self.scale * torch.exp(-self.log_vars)  # [T]
        self.lambdas.copy_(precision.detach())
        return (precision * losses).sum() + 0.5 * self.log_vars.sum()

    def backward(self, losses, *, extra=0.0, shared: Optional[SharedParts] = None, step: int = 0, epoch: int = 0,
                 kpi=None) -> torch.Tensor:
        total = super().backward(losses, extra=extra, shared=shared, step=step, epoch=epoch, kpi=kpi)
        all_reduce_grads_([self.log_vars])  # the log σ² are outside DDP: average their gradient here
        return total
