"""Dynamic Weight Average (Liu et al. 2019): ``λ_t = T·softmax_t(r_t / Temp)``, ``r_t = L̄_t(e−1) / L̄_t(e−2)``.

``L̄_t(e)`` is the mean loss of task t over epoch e (averaged over ranks when the epoch ends, so every rank
gets the same weights). The first two epochs use ``λ_t = 1``. The weights change only between epochs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..components import BALANCERS
from .base import Balancer, all_reduce_mean_


def dwa_weights(previous: torch.Tensor, before: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T·softmax((previous/before)/Temp)`` for the epoch means ``previous`` = L̄(e−1), ``before`` = L̄(e−2)."""
    ratio = previous / before.clamp(min=1e-12)
    return previous.numel() * torch.softmax(ratio / temperature, dim=0)


@BALANCERS.register("dwa")
class DWA(Balancer):
    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        if temperature <= 0:
            raise ValueError(f"dwa temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        T = self.num_tasks
        self.register_buffer("epoch_sum", torch.zeros(T))  # Σ L_t over the current epoch's steps
        self.register_buffer("epoch_steps", torch.zeros(()))
        self.register_buffer("history", torch.zeros(2, T))  # [L̄(e−2), L̄(e−1)]
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("current_epoch", torch.full((), -1, dtype=torch.long))
        self._epoch: Optional[int] = None  # host copy of current_epoch (read once after construction/loading)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._epoch = None

    def _close_epoch(self) -> None:
        mean = all_reduce_mean_(self.epoch_sum / self.epoch_steps.clamp(min=1))
        self.history.copy_(torch.stack([self.history[1], mean]))
        self.epochs_done += 1
        self.epoch_sum.zero_()
        self.epoch_steps.zero_()
        if int(self.epochs_done) >= 2:
            self.lambdas.copy_(dwa_weights(self.history[1], self.history[0], self.temperature))

    def combine(self, losses: torch.Tensor, *, step: int, epoch: int, kpi: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._epoch is None:
            self._epoch = int(self.current_epoch)
        if epoch != self._epoch:  # a new epoch: the finished one enters the history
            if int(self.epoch_steps) > 0:
                self._close_epoch()
            self.current_epoch.fill_(epoch)
            self._epoch = epoch
        self.epoch_sum += losses.detach()
        self.epoch_steps += 1
        return (self.lambdas * losses).sum()
