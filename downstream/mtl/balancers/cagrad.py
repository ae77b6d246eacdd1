"""CAGrad (Liu et al., NeurIPS 2021): the update that maximises the worst-case local improvement near the mean gradient.

With ``g_0`` the mean task gradient and ``φ = c²‖g_0‖²``: ``w* = argmin_{w ∈ simplex} g_wᵀ g_0 + √φ ‖g_w‖``
(``g_w = Σ w_t g_t``), and the update ``d = g_0 + (√φ / ‖g_w*‖) g_w*``, divided by ``1 + c²`` (the published
default rescaling; ``rescale: false`` keeps d). Solved on the Gram matrix (SLSQP over the simplex), so
``d = Σ_t coef_t g_t``. Only the shared (encoder) parameters are combined; the decoders get their plain task
gradients (the gradient of ``Σ_t L_t``).

``convention`` (how ``d`` is scaled on the shared parameters):

- ``paper`` (default): ``T·d``, as the paper's algorithm (the update of the *sum* of the losses) and the official
  code (Cranial-XIX/CAGrad, ``nyuv2/utils.py``: ``overwrite_grad`` multiplies by the number of tasks "to match the
  sum loss"). ``c = 0`` then gives ``Σ_t g_t``, exactly ``fixed`` (equal weights) on every parameter.
- ``libmtl``: ``d`` itself (LibMTL's ``CAGrad``): the encoder gets the *mean* gradient while the decoders get the
  sum, i.e. the encoder's effective learning rate is 1/T of fixed's at ``c = 0``. For reproducing LibMTL's tables.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from scipy.optimize import minimize

from ..components import BALANCERS
from .base import GradientBalancer

CONVENTIONS = ("paper", "libmtl")


def cagrad_coefficients(gram: torch.Tensor, c: float, *, rescale: bool = True, convention: str = "paper") -> torch.Tensor:
    """[T] coefficients of the shared update over the task gradients, from their [T, T] Gram matrix."""
    if convention not in CONVENTIONS:
        raise ValueError(f"cagrad convention={convention!r}; known: {', '.join(CONVENTIONS)}")
    G = gram.double().cpu().numpy()
    T = G.shape[0]
    mean = np.full(T, 1.0 / T)
    if c == 0:
        coef = mean
    else:
        sqrt_phi = c * np.sqrt(max(mean @ G @ mean, 0.0)) + 1e-8
        Gb = G @ mean  # g_t · g_0

        def objective(w: np.ndarray) -> float:
            return float(w @ Gb + sqrt_phi * np.sqrt(max(w @ G @ w, 0.0) + 1e-8))

        result = minimize(objective, mean, bounds=[(0.0, 1.0)] * T, method="SLSQP",
                          constraints=({"type": "eq", "fun": lambda w: 1.0 - w.sum()},), options={"ftol": 1e-12, "maxiter": 500})
        w = np.clip(result.x, 0.0, None)
        gw_norm = np.sqrt(max(w @ G @ w, 0.0))
        coef = mean + (sqrt_phi / (gw_norm + 1e-8)) * w
        if rescale:
            coef = coef / (1 + c ** 2)
    if convention == "paper":
        coef = coef * T
    return torch.from_numpy(coef)


@BALANCERS.register("cagrad")
class CAGrad(GradientBalancer):
    def __init__(self, tasks: Sequence[str], c: float = 0.4, rescale: bool = True, convention: str = "paper") -> None:
        super().__init__(tasks)
        if c < 0:
            raise ValueError(f"cagrad c must be >= 0, got {c}")
        if convention not in CONVENTIONS:
            raise ValueError(f"cagrad convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
        self.c, self.rescale, self.convention = float(c), bool(rescale), convention

    def coefficients(self, gram: torch.Tensor, *, step: int, losses: Optional[torch.Tensor] = None) -> torch.Tensor:
        return cagrad_coefficients(gram, self.c, rescale=self.rescale, convention=self.convention)
