"""Boundary detection ODS F-measure (BSDS protocol, in Python).

Per threshold: binarise the edge probability, thin it to one-pixel-wide curves (Zhang-Suen), then
match predicted and GT boundary pixels one-to-one when they lie within ``tolerance × image diagonal``
(maximum bipartite matching). Matches and pixel counts are summed over the dataset; ODS is the best
F-measure over the thresholds (one threshold for the whole dataset).
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree


def thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of boolean masks [..., H, W] (all leading maps thinned together)."""
    img = np.pad(mask.astype(np.uint8), [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)])
    inner = (Ellipsis, slice(1, -1), slice(1, -1))
    while True:
        changed = False
        for step in (0, 1):
            # neighbours P2..P9, clockwise from north
            p = [img[..., :-2, 1:-1], img[..., :-2, 2:], img[..., 1:-1, 2:], img[..., 2:, 2:],
                 img[..., 2:, 1:-1], img[..., 2:, :-2], img[..., 1:-1, :-2], img[..., :-2, :-2]]
            count = sum(q.astype(np.int16) for q in p)
            transitions = sum(((p[i] == 0) & (p[(i + 1) % 8] == 1)).astype(np.int16) for i in range(8))
            p2, p4, p6, p8 = p[0], p[2], p[4], p[6]
            if step == 0:
                keep_rule = ((p2 & p4 & p6) == 0) & ((p4 & p6 & p8) == 0)
            else:
                keep_rule = ((p2 & p4 & p8) == 0) & ((p2 & p6 & p8) == 0)
            remove = (img[inner] == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & keep_rule
            if remove.any():
                img[inner][remove] = 0
                changed = True
        if not changed:
            return img[inner].astype(bool)


def match_boundaries(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> int:
    """Number of one-to-one matches between boundary pixels of ``pred`` and ``gt`` within ``max_dist`` pixels."""
    pred_xy, gt_xy = np.argwhere(pred), np.argwhere(gt)
    if len(pred_xy) == 0 or len(gt_xy) == 0:
        return 0
    neighbours = cKDTree(gt_xy).query_ball_point(pred_xy, r=max_dist + 1e-9)
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
        binary = thin(prob[None] > self.thresholds[:, None, None])  # [T, H, W]
        self.num_gt += int(gt.sum())
        for i, edges in enumerate(binary):
            self.num_pred[i] += int(edges.sum())
            self.matched[i] += match_boundaries(edges, gt, max_dist)

    def compute(self) -> Dict[str, float]:
        precision = self.matched / np.maximum(self.num_pred, 1)
        recall = self.matched / max(self.num_gt, 1)
        f = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = int(np.argmax(f))
        return {"odsf": 100.0 * float(f[best]), "precision": 100.0 * float(precision[best]),
                "recall": 100.0 * float(recall[best]), "threshold": float(self.thresholds[best])}
