"""MGDA (Sener & Koltun 2018): the min-norm point of the convex hull of the task gradients.

``min_α ‖Σ_t α_t g_t‖²`` over the simplex, from the Gram matrix ``G = [g_t · g_s]``: closed form for two
tasks, Frank-Wolfe (with the exact two-point line search) for more.

- ``mgda``: ``g_t`` = gradients of the shared (encoder) parameters, averaged over ranks; the shared
  parameters get ``Σ α_t g_t``, the decoders their plain task gradients.
- ``mgda_ub`` (the upper bound of the paper): ``g_t`` = gradients w.r.t. the shared representation (the
  encoder's output maps, per sample, so the Gram matrices of the ranks add up), then one ordinary backward of
  ``Σ α_t L_t + extra``: only one backward through the encoder.

Option ``normalize: l2`` solves on ``g_t / ‖g_t‖`` instead (the reported weights are then per unit gradient).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..components import BALANCERS
from .base import Balancer, GradientBalancer, SharedParts, all_reduce_sum_


def _line_search(aa: float, ab: float, bb: float) -> float:
    """argmin_{γ∈[0,1]} ‖γ a + (1−γ) b‖² from a·a, a·b, b·b."""
    if ab >= aa:
        return 1.0
    if ab >= bb:
        return 0.0
    return (bb - ab) / (aa + bb - 2 * ab)


def min_norm_coefficients(gram: torch.Tensor, *, max_iters: int = 250, tol: float = 1e-10) -> torch.Tensor:
    """α on the simplex minimising ``αᵀ G α`` for the [T, T] Gram matrix ``gram``."""
    G = gram.double().cpu()
    T = G.shape[0]
    if T == 1:
        return torch.ones(1, dtype=torch.float64)
    if T == 2:
        g = _line_search(float(G[0, 0]), float(G[0, 1]), float(G[1, 1]))
        return torch.tensor([g, 1 - g], dtype=torch.float64)
    # start from the best pair (closed form), then Frank-Wolfe towards the vertex with the smallest g_t · g_α
    best, alpha = None, None
    for i in range(T):
        for j in range(i + 1, T):
            g = _line_search(float(G[i, i]), float(G[i, j]), float(G[j, j]))
            value = g * g * G[i, i] + 2 * g * (1 - g) * G[i, j] + (1 - g) ** 2 * G[j, j]
            if best is None or value < best:
                best = value
                alpha = torch.zeros(T, dtype=torch.float64)
                alpha[i], alpha[j] = g, 1 - g
    for _ in range(max_iters):
        Ga = G @ alpha  # [T]: g_t · g_α
        t = int(torch.argmin(Ga))
        aa, ab, bb = float(G[t, t]), float(Ga[t]), float(alpha @ Ga)  # vertex t vs the current point
        gamma = _line_search(aa, ab, bb)
        new = (1 - gamma) * alpha
        new[t] += gamma
        if float((new - alpha).abs().sum()) < tol:
            alpha = new
            break
        alpha = new
    return alpha


def normalized_gram(gram: torch.Tensor, normalize: str) -> tuple:
    """(Gram of the solved gradients, per-task scale of the coefficients)."""
    if normalize == "none":
        return gram, torch.ones(gram.shape[0], dtype=gram.dtype)
    if normalize == "l2":
        norms = gram.diagonal().clamp(min=1e-20).sqrt()
        return gram / (norms[:, None] * norms[None, :]), 1.0 / norms
    raise ValueError(f"mgda normalize={normalize!r}; known: none, l2")


@BALANCERS.register("mgda")
class MGDA(GradientBalancer):
    def __init__(self, tasks: Sequence[str], normalize: str = "none") -> None:
        super().__init__(tasks)
        normalized_gram(torch.eye(1, dtype=torch.float64), normalize)  # validate now
        self.normalize = normalize

    def coefficients(self, gram: torch.Tensor, *, step: int) -> torch.Tensor:
        G, scale = normalized_gram(gram, self.normalize)
        return min_norm_coefficients(G) * scale


@BALANCERS.register("mgda_ub")
class MGDAUpperBound(Balancer):
    needs_shared = needs_representation = True

    def __init__(self, tasks: Sequence[str], normalize: str = "none") -> None:
        super().__init__(tasks)
        normalized_gram(torch.eye(1, dtype=torch.float64), normalize)
        self.normalize = normalize

    def backward(self, losses, *, extra=0.0, shared: Optional[SharedParts] = None, step: int = 0, epoch: int = 0,
                 kpi=None) -> torch.Tensor:
        if shared is None or shared.representation is None:
            raise ValueError("mgda_ub needs the shared representation (SharedParts.of(..., capture_representation=True))")
        stacked = self.stack(losses)
        rows = []
        for loss in stacked:  # backward through the heads only, to the encoder output
            grads = torch.autograd.grad(loss, shared.representation, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(z) if g is None else g).float().reshape(-1)
                                   for g, z in zip(grads, shared.representation)]))
        Z = torch.stack(rows)  # [T, B·Σ C·H·W]
        gram = all_reduce_sum_(Z @ Z.T).double().cpu()  # the global batch's Gram (up to a constant factor)
        G, scale = normalized_gram(gram, self.normalize)
        alpha = (min_norm_coefficients(G) * scale).to(stacked.device, torch.float32)
        self.lambdas.copy_(alpha)
        total = (alpha * stacked).sum() + extra
        total.backward()
        return total.detach()
