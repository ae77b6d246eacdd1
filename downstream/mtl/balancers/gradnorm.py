"""GradNorm (Chen et al. 2018): weights that equalise the gradient norms of the weighted task losses.

At each step, with ``W`` the last shared layer (the FPN's output convs; without a neck the encoder's last conv):
``n_t = ‖∇_W L_t‖`` (gradients averaged over ranks), ``G_t = w_t n_t``, ``Ḡ = mean_t G_t``, the relative
inverse training rate ``r_t = L̃_t / mean_s L̃_s`` with ``L̃_t = L_t / L_t(0)``, the target ``Ḡ · r_t^α``
(a constant), and ``L_grad = Σ_t |G_t − Ḡ r_t^α|``. The loss of the step is ``Σ_t w_t L_t + extra``
(one ordinary backward); then ``w`` takes a gradient step on ``L_grad`` (``∂L_grad/∂w_t =
sign(G_t − target_t)·n_t``, scaled by ``1/mean_t n_t`` so ``lr`` does not depend on the gradients' scale) and
is renormalised to ``Σ_t w_t = T``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..components import BALANCERS
from .base import Balancer, SharedParts, all_reduce_mean_, task_gradients


def gradnorm_step(weights: torch.Tensor, norms: torch.Tensor, ratios: torch.Tensor, *, alpha: float,
                  lr: float) -> torch.Tensor:
    """One GradNorm update of ``weights`` [T] from the unweighted gradient norms and the loss ratios L̃_t."""
    G = weights * norms
    target = G.mean() * (ratios / ratios.mean()).pow(alpha)
    grad = torch.sign(G - target) * norms / norms.mean().clamp(min=1e-12)
    new = (weights - lr * grad).clamp(min=1e-3)
    return weights.numel() * new / new.sum()


@BALANCERS.register("gradnorm")
class GradNorm(Balancer):
    needs_shared = True

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(tasks)
        self.alpha, self.lr = float(alpha), float(lr)
        self.register_buffer("initial_losses", torch.zeros(self.num_tasks))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def backward(self, losses, *, extra=0.0, shared: Optional[SharedParts] = None, step: int = 0, epoch: int = 0,
                 kpi=None) -> torch.Tensor:
        if shared is None or not shared.last_layer:
            raise ValueError("gradnorm needs the last shared layer (SharedParts.last_layer)")
        stacked = self.stack(losses)
        grads = all_reduce_mean_(task_gradients(list(stacked), shared.last_layer))  # [T, P_last]
        current = all_reduce_mean_(stacked.detach().clone())
        if not bool(self.started):
            self.initial_losses.copy_(current)
            self.started.fill_(True)
        weights = self.lambdas.clone()
        total = (weights * stacked).sum() + extra
        total.backward()
        ratios = current / self.initial_losses.clamp(min=1e-12)
        self.lambdas.copy_(gradnorm_step(weights, grads.norm(dim=1), ratios, alpha=self.alpha, lr=self.lr))
        return total.detach()
