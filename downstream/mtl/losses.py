"""Task losses (pure functions of tensors) and the fixed-weight multi-task loss with deep supervision.
Which loss a task uses is a fact of its record (``tasks.TASKS``).

All predictions arrive at the label resolution. Conventions of the labels (as the datasets return them):
semseg / human_parts int64 [B,H,W] with 255 = ignore; sal / edge float [B,1,H,W] in {0,1} (255 = ignore);
normals float [B,3,H,W], all-zero = invalid; depth float [B,1,H,W], 0 = invalid.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from selfsup.data.labels import IGNORE_INDEX


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean CE over non-ignored pixels; 0 (with a gradient path) when every pixel is ignored."""
    total = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum()
    return total / count.clamp(min=1)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, *, pos_weight: Optional[float] = None,
                 ignore_value: float = IGNORE_INDEX) -> torch.Tensor:
    """Class-balanced binary cross-entropy, averaged over valid pixels.

    Positives are weighted ``w`` and negatives ``1 - w``; ``w = #neg / #valid`` of the batch when
    ``pos_weight`` is None (saliency), else the fixed ``pos_weight`` (edges: 0.95).
    """
    logits, target = logits.float(), target.float()
    valid = target != ignore_value
    positive = (target > 0.5) & valid
    negative = valid & ~positive
    num_valid = valid.sum().clamp(min=1)
    w = negative.sum() / num_valid if pos_weight is None else torch.as_tensor(pos_weight, device=logits.device)
    # -log sigmoid(x) and -log(1 - sigmoid(x)), numerically stable
    loss_pos = F.softplus(-logits)
    loss_neg = F.softplus(logits)
    loss = w * (loss_pos * positive).sum() + (1 - w) * (loss_neg * negative).sum()
    return loss / num_valid


def normals_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the L2-normalised prediction and the GT normals, mean over valid elements (GT not all zero)."""
    pred = F.normalize(pred.float(), p=2, dim=1)
    valid = (target.abs().sum(dim=1, keepdim=True) > 0).expand_as(target)
    return (torch.abs(pred - target) * valid).sum() / valid.sum().clamp(min=1)


def depth_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 on pixels with valid depth (GT > 0)."""
    valid = target > 0
    return (torch.abs(pred.float() - target) * valid).sum() / valid.sum().clamp(min=1)


def task_loss(task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss of ``task`` (its record's ``loss``), the prediction resized to the label first if needed."""
    from .tasks import task_record  # the record names each task's loss function (it imports this module)

    loss = task_record(task, what="loss").loss
    if pred.shape[-2:] != target.shape[-2:]:
        pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return loss(pred, target)


def extra_losses(outputs: Mapping[str, object], task_total: torch.Tensor) -> Dict[str, torch.Tensor]:
    """A model's own loss terms (already weighted), keyed ``extra/<name>``.

    ``outputs['extra_losses']`` is ``{name: scalar}`` or a callable ``f(task_total) -> {name: scalar}`` for
    terms that depend on the task losses (ASTMT's discriminator reads their gradients). Balancers never weigh
    them: they enter the total unchanged, like the auxiliary tasks.
    """
    extra = outputs.get("extra_losses")
    if extra is None:
        return {}
    extra = extra(task_total) if callable(extra) else extra
    return {f"extra/{name}": value for name, value in extra.items()}


class MultiTaskLoss(nn.Module):
    """``Σ_t w_t L_t(final)`` over main tasks + ``Σ_scales Σ_t w_t L_t(initial)`` over all supervised tasks.

    The model output is ``{'final': {task: pred}, 'initial': [{task: pred}, ...]}`` (``initial`` may be empty).
    ``forward`` returns the total and a dict of detached per-term losses for logging; :meth:`per_task` returns
    the per-task losses a balancer weighs: ``L_t = w_t · (final_t + Σ_scales initial_t)``, every term of a task
    with the task's config weight ``w_t`` (auxiliary tasks only have initial terms).
    """

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__()
        self.weights = dict(weights)

    def per_task(self, outputs: Mapping[str, object], targets: Mapping[str, torch.Tensor]):
        """``({task: L_t}, {term: detached loss})`` over every supervised task, final and initial terms."""
        terms: Dict[str, torch.Tensor] = {}
        for task, pred in outputs["final"].items():
            terms[f"final/{task}"] = task_loss(task, pred, targets[task])
        initial: List[Mapping[str, torch.Tensor]] = outputs.get("initial", [])  # type: ignore[assignment]
        for scale, preds in enumerate(initial):
            for task, pred in preds.items():
                terms[f"initial{scale}/{task}"] = task_loss(task, pred, targets[task])
        unweighted: Dict[str, torch.Tensor] = {}
        for name, value in terms.items():
            task = name.split("/")[1]
            unweighted[task] = unweighted[task] + value if task in unweighted else value
        losses = {task: self.weights[task] * value for task, value in unweighted.items()}
        extra = extra_losses(outputs, sum(losses.values()))
        losses.update(extra)
        terms.update(extra)
        return losses, {name: value.detach() for name, value in terms.items()}

    def forward(self, outputs: Mapping[str, object], targets: Mapping[str, torch.Tensor]):
        losses, terms = self.per_task(outputs, targets)
        return sum(losses.values()), terms
