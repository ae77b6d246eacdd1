"""Boundary detection ODS F-measure (BSDS protocol, in Python).

Per threshold: binarise the edge probability, thin it to one-pixel-wide curves (Zhang-Suen), then
match predicted and GT boundary pixels one-to-one when they lie within ``tolerance × image diagonal``
(maximum bipartite matching). Matches and pixel counts are summed over the dataset; ODS is the best
F-measure over the thresholds (one threshold for the whole dataset).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree


def _zhang_suen_tables() -> np.ndarray:
    """[2, 256] bool: may a foreground pixel with this 8-neighbour code be removed in sub-iteration 0 / 1?

    Bit i of the code is neighbour P(i+2): P2 north, then clockwise P3 NE, P4 E, ..., P9 NW.
    """
    tables = np.zeros((2, 256), bool)
    for code in range(256):
        p = [(code >> i) & 1 for i in range(8)]
        count = sum(p)
        transitions = sum(p[i] == 0 and p[(i + 1) % 8] == 1 for i in range(8))
        p2, p4, p6, p8 = p[0], p[2], p[4], p[6]
        base = 2 <= count <= 6 and transitions == 1
        tables[0, code] = base and p2 * p4 * p6 == 0 and p4 * p6 * p8 == 0
        tables[1, code] = base and p2 * p4 * p8 == 0 and p2 * p6 * p8 == 0
    return tables


_REMOVABLE = _zhang_suen_tables()
_BIT = (1 << np.arange(8)).astype(np.int32)


def _thin2d(mask: np.ndarray) -> np.ndarray:
    H, W = mask.shape
    Wp = W + 2
    img = np.zeros((H + 2) * Wp, np.uint8)
    img.reshape(H + 2, Wp)[1:-1, 1:-1] = mask
    offsets = np.array([-Wp, -Wp + 1, 1, Wp + 1, Wp, Wp - 1, -1, -Wp - 1])  # P2..P9

    def codes(index: np.ndarray) -> np.ndarray:
        return (img[index[:, None] + offsets] * _BIT).sum(1)

    # pending[i] bit s: pixel i must be (re-)examined in sub-iteration s (its neighbourhood changed since)
    pending = np.zeros_like(img)
    foreground = np.flatnonzero(img)
    pending[foreground[codes(foreground) != 255]] = 3  # interior pixels wait until a neighbour goes
    while pending.any():
        for step in (0, 1):
            bit = np.uint8(1 << step)
            candidates = np.flatnonzero(pending & bit)
            if candidates.size == 0:
                continue
            pending[candidates] &= ~bit
            # decisions of one sub-iteration all see the state at its start (parallel thinning)
            remove = candidates[_REMOVABLE[step][codes(candidates)]]
            if remove.size:
                img[remove] = 0
                pending[remove] = 0
                neighbours = (remove[:, None] + offsets).ravel()
                pending[neighbours[img[neighbours] == 1]] = 3
    return img.reshape(H + 2, Wp)[1:-1, 1:-1].astype(bool)


def thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of boolean masks [..., H, W] to one-pixel-wide curves.

    A pixel is examined again only when a neighbour was removed, so the cost follows the foreground
    area rather than image size × iterations.
    """
    mask = np.asarray(mask, bool)
    flat = mask.reshape(-1, *mask.shape[-2:])
    return np.stack([_thin2d(m) if m.any() else m.copy() for m in flat]).reshape(mask.shape)


def match_boundaries(pred: np.ndarray, gt: np.ndarray, max_dist: float, *, gt_tree: Optional[cKDTree] = None) -> int:
    """Number of one-to-one matches between boundary pixels of ``pred`` and ``gt`` within ``max_dist`` pixels."""
    pred_xy, gt_xy = np.argwhere(pred), np.argwhere(gt)
    if len(pred_xy) == 0 or len(gt_xy) == 0:
        return 0
    tree = gt_tree if gt_tree is not None else cKDTree(gt_xy)
    neighbours = tree.query_ball_point(pred_xy, r=max_dist + 1e-9)
    lengths = np.fromiter((len(n) for n in neighbours), dtype=np.int64, count=len(neighbours))
    if lengths.sum() == 0:
        return 0
    cols = np.fromiter((j for n in neighbours for j in n), dtype=np.int64, count=int(lengths.sum()))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    graph = csr_matrix((np.ones(len(cols), np.int8), cols, indptr), shape=(len(pred_xy), len(gt_xy)))
    return int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())


class EdgeMeter:
    def __init__(self, *, num_thresholds: int = 99, tolerance: float = 0.0075) -> None:
        self.thresholds = np.linspace(0.01, 0.99, num_thresholds)
        self.tolerance = tolerance
        self.matched = np.zeros(num_thresholds, np.int64)  # one-to-one matches (= TP of both P and R)
        self.num_pred = np.zeros(num_thresholds, np.int64)
        self.num_gt = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        prob = pred.reshape(pred.shape[-2:]).float().cpu().numpy()
        gt = target.reshape(target.shape[-2:]).cpu().numpy()
        gt = (gt > 0.5) & (gt != 255)
        max_dist = self.tolerance * float(np.hypot(*prob.shape))
        self.num_gt += int(gt.sum())
        gt_tree = cKDTree(np.argwhere(gt)) if gt.any() else None
        for i, threshold in enumerate(self.thresholds):
            if threshold >= prob.max():
                break  # nothing predicted at this or any higher threshold
            edges = thin(prob > threshold)
            self.num_pred[i] += int(edges.sum())
            if gt_tree is not None:
                self.matched[i] += match_boundaries(edges, gt, max_dist, gt_tree=gt_tree)

    def compute(self) -> Dict[str, float]:
        precision = self.matched / np.maximum(self.num_pred, 1)
        recall = self.matched / max(self.num_gt, 1)
        f = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = int(np.argmax(f))
        return {"odsf": 100.0 * float(f[best]), "precision": 100.0 * float(precision[best]),
                "recall": 100.0 * float(recall[best]), "threshold": float(self.thresholds[best])}
