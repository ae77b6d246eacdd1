"""Dynamic Task Prioritization (Guo et al. 2018): focal-style weights from a moving-average KPI per task.

``λ_t = −(1 − κ_t)^γ_t · log κ_t`` with ``κ_t ← m·κ_t + (1 − m)·KPI_t(batch)`` (the first batch sets κ),
clamped to [0.001, 0.999]. A task with a low KPI (hard) gets a high weight. The KPI of a task type, computed
on the batch's final predictions (:func:`task_kpi`, averaged over ranks every step):

- semseg, human_parts: pixel accuracy over non-ignored pixels;
- sal: IoU of the salient region at threshold 0.5;
- edge: balanced accuracy ½(recall of edge pixels + recall of non-edge pixels) at 0.5 (edges are ~5 % of the
  pixels: plain accuracy would call an all-background map easy);
- normals: fraction of valid pixels with an angular error below 30°;
- depth: δ < 1.25 (fraction of valid pixels with max(pred/gt, gt/pred) < 1.25).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch.nn import functional as F

from ..losses import IGNORE_INDEX
from ..components import BALANCERS
from .base import Balancer, all_reduce_mean_

KPI_NAMES = {"semseg": "pixel accuracy", "human_parts": "pixel accuracy", "sal": "IoU@0.5",
             "edge": "balanced accuracy@0.5", "normals": "% angle < 30°", "depth": "δ<1.25"}


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num.float() / den.float().clamp(min=1)


@torch.no_grad()
def task_kpi(task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The DTP KPI of one task on a batch, a 0-d tensor in [0, 1] (no host sync)."""
    if pred.shape[-2:] != target.shape[-2:]:
        pred = F.interpolate(pred.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    pred = pred.float()
    if task in ("semseg", "human_parts"):
        valid = target != IGNORE_INDEX
        return _ratio(((pred.argmax(1) == target) & valid).sum(), valid.sum())
    if task in ("sal", "edge"):
        valid = target != IGNORE_INDEX
        positive, predicted = (target > 0.5) & valid, (pred > 0) & valid  # logit > 0 <=> probability > 0.5
        if task == "sal":
            return _ratio((positive & predicted).sum(), (positive | predicted).sum())
        negative = valid & ~positive
        return 0.5 * (_ratio((positive & predicted).sum(), positive.sum())
                      + _ratio((negative & ~predicted).sum(), negative.sum()))
    if task == "normals":
        valid = target.abs().sum(1) > 0
        cos = (F.normalize(pred, dim=1) * target).sum(1).clamp(-1, 1)
        return _ratio(((cos > torch.cos(torch.deg2rad(torch.tensor(30.0)))) & valid).sum(), valid.sum())
    if task == "depth":
        valid = target > 0
        ratio = torch.maximum(pred / target.clamp(min=1e-6), target / pred.clamp(min=1e-6))
        return _ratio(((ratio < 1.25) & valid & (pred > 0)).sum(), valid.sum())
    raise KeyError(f"no DTP KPI for task {task!r}; known: {', '.join(KPI_NAMES)}")


def task_kpis(tasks: Sequence[str], predictions: Mapping[str, torch.Tensor],
              targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[T] KPIs of ``tasks`` in their order."""
    return torch.stack([task_kpi(t, predictions[t].detach(), targets[t]) for t in tasks])


def dtp_weights(kappa: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``−(1 − κ)^γ log κ``."""
    return -(1 - kappa).pow(gamma) * torch.log(kappa)


@BALANCERS.register("dtp")
class DTP(Balancer):
    needs_kpi = True

    def __init__(self, tasks: Sequence[str], gamma: Union[float, Dict[str, float]] = 1.0, momentum: float = 0.9) -> None:
        super().__init__(tasks)
        if isinstance(gamma, Mapping):
            unknown = sorted(set(gamma) - set(self.tasks))
            if unknown:
                raise ValueError(f"dtp gamma given for {unknown}, which are not among the tasks {list(self.tasks)}")
            gammas = [float(gamma.get(t, 1.0)) for t in self.tasks]
        else:
            gammas = [float(gamma)] * self.num_tasks
        if not 0 <= momentum < 1:
            raise ValueError(f"dtp momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("gamma", torch.tensor(gammas))
        self.register_buffer("kappa", torch.zeros(self.num_tasks))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def combine(self, losses: torch.Tensor, *, step: int, epoch: int, kpi: Optional[torch.Tensor] = None) -> torch.Tensor:
        if kpi is None:
            raise ValueError("dtp needs the per-task KPIs of the batch (kpi=task_kpis(...))")
        kpi = all_reduce_mean_(kpi.detach().float().clone())
        m = torch.where(self.started, torch.tensor(self.momentum, device=kpi.device), torch.zeros((), device=kpi.device))
        self.kappa.copy_(m * self.kappa + (1 - m) * kpi)
        self.started.fill_(True)
        self.lambdas.copy_(dtp_weights(self.kappa.clamp(1e-3, 1 - 1e-3), self.gamma))
        return (self.lambdas * losses).sum()
