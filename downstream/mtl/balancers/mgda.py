"""MGDA (Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull of the task gradients.

``min_α ‖Σ_t α_t g_t‖²`` over the simplex, from the Gram matrix ``G = [g_t · g_s]``: closed form for two
tasks, Frank-Wolfe (with the exact two-point line search) for more.

- ``mgda``: ``g_t`` = gradients of the shared (encoder) parameters, averaged over ranks.
- ``mgda_ub`` (the upper bound of the paper, MGDA-UB): ``g_t`` = gradients w.r.t. the shared representation
  (the encoder's output maps, per sample, so the Gram matrices of the ranks add up); only one backward through
  the encoder.

``convention`` (what the α multiply):

- ``paper`` (default, both variants): the paper's Algorithm 2 — the shared parameters get ``Σ_t α_t ∇L_t``, the
  task-specific parameters (decoders, heads) their plain task gradients ``∇L_t``. ``mgda_ub`` does this with
  two backwards restricted to their inputs (shared: ``Σ_t α_t L_t + extra``; the rest: ``Σ_t L_t + extra``)
  under DDP's ``no_sync()``, then averages every gradient over the ranks once.
- ``published``: the released code (isl-org/MultiObjectiveOptimization, ``multi_task/train_multi_task.py``):
  one backward of ``Σ_t α_t L_t`` (+ extra), so the decoders' gradients are scaled by α_t too (about 1/T of
  fixed's step).

``normalize`` (the reference's ``normalization_type``; only for solving, the α then multiply the *un-normalised*
losses/gradients, as in the reference): ``none`` (default; the paper has no normalisation), ``l2``
(``g_t / ‖g_t‖``), ``loss`` (``g_t / L_t``), ``loss+`` (``g_t / (L_t ‖g_t‖)``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..components import BALANCERS
from .base import (Balancer, GradientBalancer, SharedParts, all_reduce_grads_, all_reduce_mean_, all_reduce_sum_,
                   task_gradients)

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
CONVENTIONS = ("paper", "published")


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


def normalized_gram(gram: torch.Tensor, normalize: str, losses: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Gram matrix of ``g_t / n_t`` with the reference's normaliser ``n_t`` (``losses``: the [T] loss values)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"mgda normalize={normalize!r}; known: {', '.join(NORMALIZATIONS)}")
    if normalize == "none":
        return gram
    norms = gram.diagonal().clamp(min=0).sqrt()
    if normalize in ("loss", "loss+"):
        if losses is None:
            raise ValueError(f"mgda normalize={normalize!r} needs the task losses")
        losses = losses.to(gram.dtype).abs()
        norms = losses if normalize == "loss" else losses * norms
    n = norms.clamp(min=1e-20)
    return gram / (n[:, None] * n[None, :])


def _check(name: str, normalize: str, convention: str) -> None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"{name} normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"{name} convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")


@BALANCERS.register("mgda")
class MGDA(GradientBalancer):
    def __init__(self, tasks: Sequence[str], normalize: str = "none", convention: str = "paper") -> None:
        super().__init__(tasks)
        _check("mgda", normalize, convention)
        self.normalize, self.convention = normalize, convention

    def coefficients(self, gram: torch.Tensor, *, step: int, losses: Optional[torch.Tensor] = None) -> torch.Tensor:
        return min_norm_coefficients(normalized_gram(gram, self.normalize, losses))

    def backward(self, losses, *, extra=0.0, shared: Optional[SharedParts] = None, step: int = 0, epoch: int = 0,
                 kpi=None) -> torch.Tensor:
        if self.convention == "paper":
            return super().backward(losses, extra=extra, shared=shared, step=step, epoch=epoch, kpi=kpi)
        # published: the shared part as in the paper, the decoders' gradients scaled by α as well
        if shared is None:
            raise ValueError("mgda needs the shared parameters (SharedParts)")
        stacked = self.stack(losses)
        task_grads = all_reduce_mean_(task_gradients(list(stacked), shared.params))
        loss_values = all_reduce_mean_(stacked.detach().clone()).double().cpu()
        alpha = self.coefficients((task_grads @ task_grads.T).double().cpu(), step=step, losses=loss_values)
        self.lambdas.copy_(alpha.to(self.lambdas))
        total = (self.lambdas * stacked).sum() + extra
        total.backward()  # under no_sync: every gradient is reduced here, once
        all_reduce_grads_([*shared.params, *shared.other])
        return total.detach()


@BALANCERS.register("mgda_ub")
class MGDAUpperBound(Balancer):
    needs_shared = needs_representation = True

    def __init__(self, tasks: Sequence[str], normalize: str = "none", convention: str = "paper") -> None:
        super().__init__(tasks)
        _check("mgda_ub", normalize, convention)
        self.normalize, self.convention = normalize, convention
        self.reduces_gradients = convention == "paper"  # paper: two restricted backwards, reduced here

    def backward(self, losses, *, extra=0.0, shared: Optional[SharedParts] = None, step: int = 0, epoch: int = 0,
                 kpi=None) -> torch.Tensor:
        if shared is None or shared.representation is None:
            raise ValueError("mgda_ub needs the shared representation (SharedParts.of(..., capture_representation=True))")
        stacked = self.stack(losses)
        reps = shared.representation
        rows = []
        for loss in stacked:  # backward through the heads only, to the encoder output
            grads = torch.autograd.grad(loss, reps, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(z) if g is None else g).float().reshape(-1)
                                   for g, z in zip(grads, reps)]))
        Z = torch.stack(rows)  # [T, B·Σ C·H·W]
        gram = all_reduce_sum_(Z @ Z.T).double().cpu()  # the global batch's Gram (up to a constant factor)
        loss_values = all_reduce_mean_(stacked.detach().clone()).double().cpu()
        alpha = min_norm_coefficients(normalized_gram(gram, self.normalize, loss_values)).to(stacked.device, torch.float32)
        self.lambdas.copy_(alpha)
        if self.convention == "published":
            total = (alpha * stacked).sum() + extra
            total.backward()
            return total.detach()
        # paper: the shared parameters get ∇(Σ α_t L_t + extra), every other parameter ∇(Σ L_t + extra); two
        # backwards restricted to their inputs (exact also where later layers read shared maps other than z, as
        # in branched networks), under DDP's no_sync (reduces_gradients) and averaged over ranks once here
        torch.autograd.backward((alpha * stacked).sum() + extra, inputs=shared.params, retain_graph=bool(shared.other))
        total = stacked.sum() + extra
        if shared.other:
            torch.autograd.backward(total, inputs=shared.other)
        all_reduce_grads_([*shared.params, *shared.other])
        return total.detach()
