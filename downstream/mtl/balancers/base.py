"""The balancer interface: per-task losses in, a backward pass out.

A balancer sees the per-task losses ``L_t`` (main tasks, each already ``config weight × (final + Σ initial
terms)``), the loss of the terms it does not balance (auxiliary tasks and any extra term, ``extra``), the
shared part of the model (:class:`SharedParts`) and the step/epoch counters. ``backward`` leaves the
gradients in ``.grad`` and returns the detached total loss.

Two kinds:
- loss weighting (fixed, uncertainty, dwa, dtp, auto_magnitude, gradnorm, mgda_ub with ``convention: published``):
  ``Σ_t λ_t L_t + extra`` goes through one ordinary ``backward()`` (under DDP: DDP's single all-reduce);
- gradient manipulation (mgda, pcgrad, cagrad, mgda_ub, ``reduces_gradients = True``): the per-task gradients of the
  shared parameters are computed with ``torch.autograd.grad``, averaged over ranks once, combined, and written
  into ``.grad``; the other parameters get the plain gradient of ``Σ_t L_t + extra``, averaged over ranks once.
  The engine runs forward and backward of these under DDP's ``no_sync()``, so nothing is reduced twice.

Collectives only happen behind ``dist.is_initialized()`` guards: every balancer runs in one CPU process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (identity in one process)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


@dataclass
class SharedParts:
    """What a balancer may touch: the shared (encoder) parameters, its last layer, its output representation.

    ``other`` holds every other trainable parameter (decoders, heads), which gradient-manipulating balancers
    give the plain task gradients. ``representation`` is the encoder's output of the last forward pass
    (a list of maps), captured by a forward hook only when the balancer asks for it.
    """

    params: List[nn.Parameter]
    last_layer: List[nn.Parameter]
    other: List[nn.Parameter]
    representation: Optional[List[torch.Tensor]] = field(default=None, repr=False)

    @classmethod
    def of(cls, model: nn.Module, *, capture_representation: bool = False) -> "SharedParts":
        """``model.encoder`` is the shared part; its last layer is the FPN's output convs, else its last conv/linear.

        A model without one encoder (``branched``) gives its own through ``model.shared_parts(capture_representation=)``.
        """
        if hasattr(model, "shared_parts"):
            return model.shared_parts(capture_representation=capture_representation)
        encoder = getattr(model, "encoder", None)
        if encoder is None:
            raise ValueError(f"{type(model).__name__} has no shared .encoder")
        params = [p for p in encoder.parameters() if p.requires_grad]
        ids = {id(p) for p in params}
        other = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        output_layers = getattr(getattr(encoder, "neck", None), "output", None)
        if output_layers is None:
            layers = [m for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            output_layers = layers[-1:]
        last = [p for m in output_layers for p in m.parameters() if p.requires_grad]
        parts = cls(params=params, last_layer=last, other=other)
        if capture_representation:
            parts.capture_output_of(encoder)
        return parts

    def capture_output_of(self, module: nn.Module) -> None:
        """From now on ``representation`` is ``module``'s output of the last forward (a forward hook)."""
        def hook(_module, _inputs, output):
            self.representation = list(output) if isinstance(output, (list, tuple)) else [output]
        module.register_forward_hook(hook)


def task_gradients(losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """[len(losses), Σ numel] fp32: the flattened gradient of each loss w.r.t. ``inputs`` (graph retained)."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(inputs), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(x) if g is None else g).float().reshape(-1)
                               for g, x in zip(grads, inputs)]))
    return torch.stack(rows)


def write_gradient_(params: Sequence[nn.Parameter], flat: torch.Tensor) -> None:
    """Add the flattened ``flat`` into the ``.grad`` of ``params`` (allocating where empty)."""
    offset = 0
    for p in params:
        g = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)


def all_reduce_grads_(params: Sequence[nn.Parameter]) -> None:
    """Average the ``.grad`` of ``params`` over ranks in one flattened collective (no-op in one process)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class Balancer(nn.Module):
    """Base: fixed weights ``λ_t`` (the buffer ``lambdas``), one ``backward()`` of ``Σ λ_t L_t + extra``.

    Subclasses override :meth:`combine` (loss weighting) or :meth:`backward` (gradient manipulation). The
    state (weights, running statistics) lives in buffers/parameters, so ``state_dict()`` goes into the
    checkpoint and a resumed run continues with the same weights.
    """

    reduces_gradients = False  # True: writes and all-reduces every gradient itself (engine: DDP no_sync)
    needs_shared = False  # True: backward uses SharedParts (shared parameters, last shared layer or representation)
    needs_representation = False  # True: SharedParts.representation is captured at each forward
    needs_kpi = False  # True: the engine passes kpi = per-task KPIs of the batch in (0, 1) (dtp)

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a balancer needs at least one task")
        self.tasks = tuple(tasks)
        self.register_buffer("lambdas", torch.ones(len(self.tasks)))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def stack(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [t for t in self.tasks if t not in losses]
        if missing:
            raise KeyError(f"balancer over {list(self.tasks)} got no loss for {missing}")
        return torch.stack([losses[t].float() for t in self.tasks])  # [T]

    def combine(self, losses: torch.Tensor, *, step: int, epoch: int, kpi: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The balanced loss of the main tasks from ``losses`` [T]."""
        return (self.lambdas.to(losses.dtype) * losses).sum()

    def backward(self, losses: Mapping[str, torch.Tensor], *, extra: torch.Tensor | float = 0.0,
                 shared: Optional[SharedParts] = None, step: int = 0, epoch: int = 0,
                 kpi: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Backpropagate the balanced loss; returns the detached total."""
        total = self.combine(self.stack(losses), step=step, epoch=epoch, kpi=kpi) + extra
        total.backward()
        return total.detach()

    def weights(self) -> Dict[str, float]:
        """The current balancer weight of each task (multiplies the task's config-weighted loss)."""
        return {t: float(w) for t, w in zip(self.tasks, self.lambdas.detach().cpu())}


class GradientBalancer(Balancer):
    """Combines the per-task gradients of the shared parameters as ``Σ_t c_t g_t`` with ``c = coefficients(G)``.

    ``g_t = ∇_shared L_t`` (averaged over ranks once), ``G = [g_t · g_s]``. The coefficients of the last step
    are the reported weights. Non-shared parameters get the plain gradient of ``Σ_t L_t + extra``; the
    shared ones also get ``∇_shared extra`` (auxiliary tasks keep their fixed weight).
    """

    reduces_gradients = True
    needs_shared = True

    def coefficients(self, gram: torch.Tensor, *, step: int, losses: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[T] float64 coefficients from the [T, T] float64 Gram matrix of the task gradients (``losses``: the
        detached per-task losses [T], averaged over ranks, for balancers that normalise by them)."""
        raise NotImplementedError

    def backward(self, losses: Mapping[str, torch.Tensor], *, extra: torch.Tensor | float = 0.0,
                 shared: Optional[SharedParts] = None, step: int = 0, epoch: int = 0,
                 kpi: Optional[torch.Tensor] = None) -> torch.Tensor:
        if shared is None:
            raise ValueError(f"{type(self).__name__} needs the shared parameters (SharedParts)")
        stacked = self.stack(losses)
        has_extra = isinstance(extra, torch.Tensor) and extra.requires_grad
        grads = task_gradients([*stacked, *([extra] if has_extra else [])], shared.params)  # [T(+1), P]
        all_reduce_mean_(grads)  # the only reduction of the shared gradients
        task_grads = grads[:self.num_tasks]
        gram = (task_grads @ task_grads.T).double().cpu()  # [T, T]; one small host copy per step
        loss_values = all_reduce_mean_(stacked.detach().clone()).double().cpu()
        coeffs = self.coefficients(gram, step=step, losses=loss_values).to(grads.device, torch.float32)
        self.lambdas.copy_(coeffs)
        combined = coeffs @ task_grads + (grads[-1] if has_extra else 0.0)
        total = stacked.sum() + extra
        if shared.other:
            torch.autograd.backward(total, inputs=shared.other)  # decoders/heads: plain task gradients
            all_reduce_grads_(shared.other)
        write_gradient_(shared.params, combined)
        return total.detach()
