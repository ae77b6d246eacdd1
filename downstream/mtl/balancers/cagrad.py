"""CAGrad (Liu et al. 2021): the update that maximises the worst-case local improvement near the mean gradient.

With ``g_0`` the mean task gradient and ``φ = c²‖g_0‖²``: ``w* = argmin_{w ∈ simplex} g_wᵀ g_0 + √φ ‖g_w‖``
(``g_w = Σ w_t g_t``), and the update ``d = g_0 + (√φ / ‖g_w*‖) g_w*``, divided by ``1 + c²`` (the published
default rescaling; ``rescale: false`` keeps d). ``c = 0`` gives ``g_0``. Solved on the Gram matrix (SLSQP over
the simplex), so ``d = Σ_t coef_t g_t``. Only the shared (encoder) parameters are combined.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import minimize

from ..components import BALANCERS
from .base import GradientBalancer


def cagrad_coefficients(gram: torch.Tensor, c: float, *, rescale: bool = True) -> torch.Tensor:
    """[T] coefficients of ``d`` over the task gradients, from their [T, T] Gram matrix."""
    G = gram.double().cpu().numpy()
    T = G.shape[0]
    mean = np.full(T, 1.0 / T)
    if c == 0:
        return torch.from_numpy(mean)
    sqrt_phi = c * np.sqrt(max(mean @ G @ mean, 0.0)) + 1e-8
    Gb = G @ mean  # g_t · g_0

    def objective(w: np.ndarray) -> float:
        return float(w @ Gb + sqrt_phi * np.sqrt(max(w @ G @ w, 0.0) + 1e-8))

    result = minimize(objective, mean, bounds=[(0.0, 1.0)] * T, method="SLSQP",
                      constraints=({"type": "eq", "fun": lambda w: 1.0 - w.sum()},))
    w = np.clip(result.x, 0.0, None)
    gw_norm = np.sqrt(max(w @ G @ w, 0.0))
    coef = mean + (sqrt_phi / (gw_norm + 1e-4)) * w
    if rescale:
        coef = coef / (1 + c ** 2)
    return torch.from_numpy(coef)


@BALANCERS.register("cagrad")
class CAGrad(GradientBalancer):
    def __init__(self, tasks: Sequence[str], c: float = 0.4, rescale: bool = True) -> None:
        super().__init__(tasks)
        if c < 0:
            raise ValueError(f"cagrad c must be >= 0, got {c}")
        self.c, self.rescale = float(c), bool(rescale)

    def coefficients(self, gram: torch.Tensor, *, step: int) -> torch.Tensor:
        return cagrad_coefficients(gram, self.c, rescale=self.rescale)
