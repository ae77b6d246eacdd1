"""PCGrad (Yu et al. 2020): project away the conflicting components of the task gradients, then sum.

For each task gradient ``g_t``, in a random order of the other tasks j: if ``g_t' · g_j < 0``,
``g_t' ← g_t' − (g_t' · g_j / ‖g_j‖²) g_j``; the shared parameters get ``Σ_t g_t'``. Everything is computed on
the Gram matrix (``g_t'`` as coefficients over the ``g_s``), so the shared gradients are touched once.
The order comes from a generator seeded with (seed, step): the same on every rank and after a resume.
Only the shared (encoder) parameters are projected; the decoders get their plain task gradients.

``reduction``: ``sum`` (default; the paper's Algorithm 1, ``g = Σ_i g_i^PC``, so PCGrad without conflicts is
``fixed``) or ``mean`` (WeiChengTseng/Pytorch-PCGrad's default ``reduction='mean'``: the shared update / T).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..components import BALANCERS
from .base import GradientBalancer


def pcgrad_projection(gram: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[T, T] C with ``g_t' = Σ_s C[t, s] g_s`` (row t: the projected gradient of task t)."""
    G = gram.double()
    T = G.shape[0]
    C = torch.eye(T, dtype=torch.float64)
    for t in range(T):
        others = [j for j in torch.randperm(T, generator=generator).tolist() if j != t]
        for j in others:
            dot = float(C[t] @ G[:, j])  # g_t' · g_j
            if dot < 0 and float(G[j, j]) > 0:
                C[t, j] -= dot / float(G[j, j])
    return C


@BALANCERS.register("pcgrad")
class PCGrad(GradientBalancer):
    def __init__(self, tasks: Sequence[str], seed: int = 0, reduction: str = "sum") -> None:
        super().__init__(tasks)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"pcgrad reduction must be one of sum, mean, got {reduction!r}")
        self.seed, self.reduction = int(seed), reduction

    def coefficients(self, gram: torch.Tensor, *, step: int, losses: Optional[torch.Tensor] = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        C = pcgrad_projection(gram, generator)
        return C.sum(0) if self.reduction == "sum" else C.mean(0)
