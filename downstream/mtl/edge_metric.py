"""Boundary detection ODS F-measure as the SEISM / BSDS code computes it, in Python.

Per threshold: binarise the edge probability, thin it to one-pixel-wide curves with MATLAB
``bwmorph(·, 'thin', Inf)`` semantics (``selfsup.data.labels.thin``, i.e. ``skimage.morphology.thin``), then
match predicted and GT boundary pixels one-to-one when they lie within ``tolerance × image diagonal``
(maximum bipartite matching). Matches and pixel counts are summed over the dataset; ODS is the best
F-measure over the thresholds (one threshold for the whole dataset). The GT is the dataset's edge map
(PASCAL-Context: ``bwmorph(seg2bmap(LabelMap), 'thin')``, built by the reader).

On PASCAL-Context the published figures use the SEISM ``test_new`` subset of val: see :func:`edge_eval_ids`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, FrozenSet, Optional, Sequence

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree

from selfsup.data.labels import thin
from downstream.datasets.pascal_context import edge_test_ids

logger = logging.getLogger(__name__)


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


def edge_eval_ids(spec: str, *, dataset: str, val_ids: Sequence[str]) -> Optional[FrozenSet[str]]:
    """Ids of the val images whose edges are evaluated (``eval.edge_ids``); None = every image.

    ``all``: every val image. ``seism`` (default): on PASCAL-Context, the val images of the SEISM ``test_new``
    subset (2,498 ids, the published protocol); when the split holds none of them (the embedded data, a custom
    split) every image is evaluated, with a warning; other datasets: every image. Anything else: a text file
    with one id per line (at least one must be in the split).
    """
    if spec == "all":
        return None
    if spec == "seism":
        if dataset != "pascal_context":
            return None
        subset = edge_test_ids() & frozenset(val_ids)
        if not subset:
            logger.warning("eval.edge_ids=seism: no val id is in the SEISM test subset (embedded or custom data): "
                           "edges are evaluated on all %d val images", len(val_ids))
            return None
        logger.info("edges evaluated on the SEISM test subset: %d of %d val images", len(subset), len(val_ids))
        return subset
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"eval.edge_ids={spec!r}: expected 'seism', 'all' or a file of image ids")
    subset = frozenset(path.read_text().split()) & frozenset(val_ids)
    if not subset:
        raise ValueError(f"eval.edge_ids={spec}: none of its ids is in the val split")
    return subset
