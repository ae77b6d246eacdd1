"""Fixed weighting: every task keeps its config weight (``λ_t = 1``); today's behaviour and the default."""
from __future__ import annotations

from typing import Sequence

from ..components import BALANCERS
from .base import Balancer


@BALANCERS.register("fixed")
class Fixed(Balancer):
    """``Σ_t L_t + extra``, one backward, no extra work."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
