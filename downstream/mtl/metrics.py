"""Dense prediction metrics, accumulated image by image at the original resolution.

Every meter has ``update(pred, target)`` for one image and ``compute() -> dict``:
  semseg / human_parts: mIoU from dataset-level TP/FP/FN (classes absent from GT and prediction skipped);
  sal:     per-image precision/recall/IoU at thresholds linspace(0.2, 0.9, 15), averaged over images;
           maxF = max over thresholds of 2PR/(P+R) of the mean P and R; mIoU at that threshold ('miou') and
           the maximum over thresholds ('miou_max', what the published evaluation reports); an image whose GT
           and thresholded prediction are both empty has IoU 1;
  normals: angle (degrees) between normalised prediction and GT on valid pixels: mean, median, rmse,
           % within 11.25 / 22.5 / 30;
  depth:   rmse over all valid pixels of the set, log-RMSE, abs-rel, δ < 1.25^k;
  edge:    ODS F-measure (see edge_metric.py).
Predictions are post-processed model outputs (see ``postprocess``): class ids, probabilities, unit vectors, metres.
Which meter and post-processing a task uses is a fact of its record (``tasks.TASKS``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch
from torch.nn import functional as F

from frozen.miou import IGNORE_INDEX, SegmentationMeter  # noqa: F401  (the frozen evaluations' meter)

from .edge_metric import EdgeMeter  # noqa: F401  (the edge task's meter)


class SaliencyMeter:
    def __init__(self, thresholds: Optional[np.ndarray] = None) -> None:
        self.thresholds = torch.as_tensor(np.linspace(0.2, 0.9, 15) if thresholds is None else thresholds, dtype=torch.float32)
        self.precision = torch.zeros(len(self.thresholds), dtype=torch.float64)
        self.recall = torch.zeros_like(self.precision)
        self.iou = torch.zeros_like(self.precision)
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        prob = pred.reshape(1, -1).float().cpu()
        gt = (target.reshape(1, -1).float().cpu() > 0.5)
        binary = prob > self.thresholds[:, None]  # [T, N]
        tp = (binary & gt).sum(1).double()
        fp = (binary & ~gt).sum(1).double()
        fn = (~binary & gt).sum(1).double()
        eps = 1e-8
        self.precision += tp / (tp + fp + eps)
        self.recall += tp / (tp + fn + eps)
        union = tp + fp + fn
        self.iou += torch.where(union > 0, tp / union.clamp(min=1), torch.ones_like(union))  # empty/empty: IoU 1
        self.count += 1

    def compute(self) -> Dict[str, float]:
        n = max(self.count, 1)
        p, r, iou = self.precision / n, self.recall / n, self.iou / n
        f = 2 * p * r / (p + r).clamp(min=1e-8)
        best, best_iou = int(torch.argmax(f)), int(torch.argmax(iou))
        return {"maxf": 100.0 * float(f[best]), "miou": 100.0 * float(iou[best]),
                "threshold": float(self.thresholds[best]), "miou_max": 100.0 * float(iou[best_iou]),
                "miou_max_threshold": float(self.thresholds[best_iou])}


class NormalsMeter:
    """Exact mean / rmse / threshold fractions; the median from a 0.001-degree histogram."""

    BIN = 0.001

    def __init__(self) -> None:
        self.histogram = np.zeros(int(round(180 / self.BIN)) + 1, np.int64)
        self.sum = self.sum_sq = 0.0
        self.count = 0
        self.within = {11.25: 0, 22.5: 0, 30.0: 0}

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.reshape(3, -1).double().cpu(), target.reshape(3, -1).double().cpu()
        valid = target.abs().sum(0) > 0
        p, t = F.normalize(pred[:, valid], dim=0), F.normalize(target[:, valid], dim=0)
        angle = torch.rad2deg(torch.acos((p * t).sum(0).clamp(-1, 1))).numpy()
        self.sum += float(angle.sum())
        self.sum_sq += float((angle ** 2).sum())
        self.count += angle.size
        for limit in self.within:
            self.within[limit] += int((angle < limit).sum())
        self.histogram += np.bincount(np.round(angle / self.BIN).astype(np.int64), minlength=len(self.histogram))

    def compute(self) -> Dict[str, float]:
        n = max(self.count, 1)
        cumulative = np.cumsum(self.histogram)
        median = float(np.searchsorted(cumulative, (self.count + 1) / 2) * self.BIN) if self.count else 0.0
        out = {"mean": self.sum / n, "median": median, "rmse": math.sqrt(self.sum_sq / n)}
        out.update({f"within_{limit:g}": 100.0 * c / n for limit, c in self.within.items()})
        return out


class DepthMeter:
    def __init__(self) -> None:
        self.sq = self.log_sq = self.abs_rel = 0.0
        self.delta = [0, 0, 0]
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.reshape(-1).double().cpu(), target.reshape(-1).double().cpu()
        valid = target > 0
        p, t = pred[valid].clamp(min=1e-9), target[valid]
        self.sq += float(((p - t) ** 2).sum())
        self.log_sq += float(((torch.log(p) - torch.log(t)) ** 2).sum())
        self.abs_rel += float((torch.abs(p - t) / t).sum())
        ratio = torch.maximum(p / t, t / p)
        for k in range(3):
            self.delta[k] += int((ratio < 1.25 ** (k + 1)).sum())
        self.count += int(valid.sum())

    def compute(self) -> Dict[str, float]:
        n = max(self.count, 1)
        out = {"rmse": math.sqrt(self.sq / n), "log_rmse": math.sqrt(self.log_sq / n), "abs_rel": self.abs_rel / n}
        out.update({f"delta{k + 1}": 100.0 * d / n for k, d in enumerate(self.delta)})
        return out


def build_meter(task: str, *, num_outputs: int, edge_thresholds: int = 99, edge_tolerance: float = 0.0075):
    """The meter of ``task`` (its record's ``meter``)."""
    from .tasks import task_record  # the record names each task's meter (it imports this module)

    return task_record(task, what="metric").meter(num_outputs=num_outputs, edge_thresholds=edge_thresholds,
                                                  edge_tolerance=edge_tolerance)


def postprocess(task: str, output: torch.Tensor) -> torch.Tensor:
    """Raw network output [B,c,H,W] -> what the meters take: class ids [B,H,W], probabilities, unit normals, depth
    (by the record's label kind)."""
    from .tasks import task_record

    return task_record(task, what="post-processing").postprocess(output)
