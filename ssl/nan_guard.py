"""A NaN/Inf guard for training loops that never makes a step wait on the device.

``update(loss, label)`` runs every step: it only queues two tiny device ops that remember the first
non-finite loss since the last check. ``check()`` is the one place that reads the flag back (a host-device
sync): call it every ``every`` steps (``due``) and always before a checkpoint is written, so that the last
good checkpoint is never overwritten by a non-finite state.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch


class NonFiniteGuard:
    """Remembers the first non-finite loss since the last ``check`` (on the loss's device)."""

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"nan_check_every={every}: expected an integer >= 1")
        self.every = int(every)
        self._labels: List[str] = []  # one description per step since the last check
        self._first: Optional[torch.Tensor] = None  # index into _labels of the first bad step, -1 = none
        self._value: Optional[torch.Tensor] = None  # that step's loss

    def update(self, loss: torch.Tensor, label: str) -> None:
        """Record ``loss`` (a scalar tensor) of the step described by ``label``; no sync."""
        loss = loss.detach().reshape(())
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._value = torch.zeros((), dtype=loss.dtype, device=loss.device)
        new = ~torch.isfinite(loss) & (self._first < 0)
        self._first = torch.where(new, len(self._labels), self._first)
        self._value = torch.where(new, loss, self._value)
        self._labels.append(label)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def check(self, parameters: Iterable[torch.Tensor] = (), where: str = "") -> None:
        """Raise ``FloatingPointError`` if a recorded loss (or one of ``parameters``) is not finite.

        ``where`` ends the message (e.g. which checkpoint is left untouched). Resets the record.
        """
        first = int(self._first) if self._first is not None else -1  # the sync
        if first >= 0:
            value, label = float(self._value), self._labels[first]
            self._reset()
            raise FloatingPointError(f"non-finite loss {value} at {label}{where}")
        self._reset()
        params = [p.detach() for p in parameters if p.is_floating_point()]
        if params and not bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(params)])).all()):
            raise FloatingPointError(f"non-finite parameters after a finite loss{where}")

    def _reset(self) -> None:
        self._labels.clear()
        self._first = self._value = None
