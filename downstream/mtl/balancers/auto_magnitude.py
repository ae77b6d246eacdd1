"""The thesis heuristic: fixed weights that equalise the average loss magnitudes of the first iterations.

For the first ``iters`` steps every task keeps ``λ_t = 1`` (its config weight) while the mean loss ``m_t`` is
measured (averaged over ranks at the end); from then on ``λ_t = mean_s(m_s) / m_t`` is fixed, so every task
contributes the same average magnitude ``λ_t m_t`` and the total magnitude ``Σ λ_t m_t = Σ m_t`` is unchanged.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..components import BALANCERS
from .base import Balancer, all_reduce_mean_


def equalising_weights(magnitudes: torch.Tensor) -> torch.Tensor:
    return magnitudes.mean() / magnitudes.clamp(min=1e-12)


@BALANCERS.register("auto_magnitude")
class AutoMagnitude(Balancer):
    def __init__(self, tasks: Sequence[str], iters: int = 20) -> None:
        super().__init__(tasks)
        if iters < 1:
            raise ValueError(f"auto_magnitude iters must be >= 1, got {iters}")
        self.iters = int(iters)
        self.register_buffer("loss_sum", torch.zeros(self.num_tasks))
        self.register_buffer("measured", torch.zeros((), dtype=torch.long))  # steps measured so far
        self._measured: Optional[int] = None  # host copy

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._measured = None

    def combine(self, losses: torch.Tensor, *, step: int, epoch: int, kpi: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._measured is None:
            self._measured = int(self.measured)
        if self._measured < self.iters:
            self.loss_sum += losses.detach()
            self.measured += 1
            self._measured += 1
            if self._measured == self.iters:  # weights for the next steps
                self.lambdas.copy_(equalising_weights(all_reduce_mean_(self.loss_sum / self.iters)))
            return losses.sum()
        return (self.lambdas * losses).sum()
