"""The segmentation meter of the frozen evaluations and the fine-tuning: mIoU from a confusion matrix."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from selfsup.data.labels import IGNORE_INDEX


class SegmentationMeter:
    """mIoU and pixel accuracy of class-id predictions, from the dataset-level confusion matrix (classes absent
    from both the ground truth and the prediction are skipped; ``ignore_index`` pixels are not counted)."""

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = np.zeros((num_classes, num_classes), np.int64)  # [gt, pred]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        valid = target != self.ignore_index
        if valid.all() and target.numel() and int(target.max()) >= self.num_classes:
            raise ValueError(f"label {int(target.max())} >= num_classes {self.num_classes}")
        index = target[valid] * self.num_classes + pred[valid].clamp(0, self.num_classes - 1)
        self.confusion += torch.bincount(index, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes).cpu().numpy()

    def compute(self) -> Dict[str, float]:
        tp = np.diag(self.confusion).astype(np.float64)
        fp = self.confusion.sum(0) - tp
        fn = self.confusion.sum(1) - tp
        denom = tp + fp + fn
        present = denom > 0
        iou = np.where(present, tp / np.maximum(denom, 1), np.nan)
        return {"miou": 100.0 * float(np.nanmean(iou)) if present.any() else 0.0,
                "pixel_acc": 100.0 * float(tp.sum() / max(self.confusion.sum(), 1))}
