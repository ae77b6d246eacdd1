"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, Algorithm 1): weights that equalise the gradient
norms of the weighted task losses.

In the paper's symbols, at each step t, with ``W`` the last shared layer (the FPN's output convs; without a neck
the encoder's last conv): ``G_W^(i)(t) = ‖∇_W w_i(t) L_i(t)‖₂ = w_i n_i`` (``n_i = ‖∇_W L_i‖``, averaged over
ranks), ``Ḡ_W(t) = E_task[G_W^(i)(t)]``, the loss ratio ``L̃_i(t) = L_i(t) / L_i(0)`` (``L_i(0)``: the first
step's loss), the relative inverse training rate ``r_i(t) = L̃_i(t) / E_task[L̃_i(t)]``, the asymmetry ``α``, and
``L_grad = Σ_i |G_W^(i)(t) − Ḡ_W(t)·r_i(t)^α|₁`` with the targets ``Ḡ_W(t)·r_i(t)^α`` held constant. The
network takes its step on ``Σ_i w_i(t) L_i(t) + extra`` (one ordinary backward); the weights take one plain
gradient step of size ``lr`` on ``L_grad`` and are renormalised to ``Σ_i w_i(t+1) = T``:

- ``convention: paper`` (default): ``w_i ← w_i − lr · ∂L_grad/∂w_i`` with the paper's gradient
  ``∂L_grad/∂w_i = sign(G_W^(i) − target_i) · n_i``;
- ``convention: normalized`` (this project's earlier default): the same gradient divided by ``mean_i n_i``, so
  ``lr`` does not depend on the scale of the gradients (a step of about ``lr`` per weight).

Both clamp the weights at 1e-3 before renormalising (the paper leaves positivity implicit).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..components import BALANCERS
from .base import Balancer, SharedParts, all_reduce_mean_, task_gradients


CONVENTIONS = ("paper", "normalized")


def gradnorm_step(weights: torch.Tensor, norms: torch.Tensor, ratios: torch.Tensor, *, alpha: float,
                  lr: float, convention: str = "paper") -> torch.Tensor:
    """One GradNorm update of ``weights`` [T] from the unweighted gradient norms and the loss ratios L̃_t."""
    G = weights * norms
    target = G.mean() * (ratios / ratios.mean()).pow(alpha)
    grad = torch.sign(G - target) * norms
    if convention == "normalized":
        grad = grad / norms.mean().clamp(min=1e-12)
    new = (weights - lr * grad).clamp(min=1e-3)
    return weights.numel() * new / new.sum()


@BALANCERS.register("gradnorm")
class GradNorm(Balancer):
    needs_shared = True

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5, lr: float = 0.025, convention: str = "paper") -> None:
        super().__init__(tasks)
        if convention not in CONVENTIONS:
            raise ValueError(f"gradnorm convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
        self.alpha, self.lr, self.convention = float(alpha), float(lr), convention
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
        self.lambdas.copy_(gradnorm_step(weights, grads.norm(dim=1), ratios, alpha=self.alpha, lr=self.lr,
                                         convention=self.convention))
        return total.detach()
