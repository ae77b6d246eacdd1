"""VOC07 linear SVM probe: one LinearSVC per class on L2-normalised pooled features, mean AP.

Protocol of the VOC07 benchmark: C = 0.5, class weights {1: 2, -1: 1}, squared hinge, difficult (0) images
count as negatives in training and testing; AP = area under the interpolated precision-recall curve of the
decision values (all points, precision made monotone from the right).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

Features = Tuple[torch.Tensor, torch.Tensor]  # (L2-normalised features [N, C], labels [N, classes] in {1,0,-1})


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of ``scores`` [N] for the bool ``positive`` [N] (nan when there is no positive)."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    if hits.sum() == 0:
        return float("nan")
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / hits.sum()
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at any higher recall
    recall_steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(recall_steps * precision))


def svm_map(train: Features, test: Features, *, cost: float = 0.5, seed: int = 0) -> Dict[str, object]:
    """mAP (percent) of per-class LinearSVCs trained on ``train`` and scored on ``test``; per-class APs too
    (classes without a test positive have no AP and are left out of the mean)."""
    from sklearn.svm import LinearSVC

    x_train, y_train = train[0].numpy().astype(np.float64), train[1].numpy()
    x_test, y_test = test[0].numpy().astype(np.float64), test[1].numpy()
    aps = []
    for c in range(y_train.shape[1]):
        target = np.where(y_train[:, c] == 1, 1, -1)  # difficult = negative
        if (target == 1).sum() == 0 or (target == -1).sum() == 0:
            raise ValueError(f"class {c}: the train split needs positives and negatives for an SVM")
        svm = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, loss="squared_hinge", penalty="l2", dual=True,
                        tol=1e-4, max_iter=2000, random_state=seed)
        svm.fit(x_train, target)
        aps.append(100.0 * average_precision(svm.decision_function(x_test), y_test[:, c] == 1))
    return {"map": float(np.nanmean(aps)), "ap_per_class": [None if np.isnan(a) else a for a in aps], "cost": cost}
