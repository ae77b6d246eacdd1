"""DAVIS-2017 semi-supervised evaluation with the official definitions (region J, boundary F, J&F).

* J = IoU of an object's predicted and ground-truth masks in one frame, void (255) pixels excluded;
  1 when both are empty.
* F = boundary F-measure: boundaries by ``seg2bmap`` of the void-masked masks, matched within a disk of
  radius ``ceil(0.008 * image diagonal)`` pixels (precision: predicted boundary pixels near a GT one;
  recall: GT boundary pixels near a predicted one); both empty = 1.
* The first (given) and last frames are excluded; per object: mean, recall (fraction of frames > 0.5)
  and decay (mean of the first quarter of the frames minus mean of the last quarter, 4 bins).
* J&F-Mean = (mean over all objects of all sequences of J-Mean + the same of F-Mean) / 2.

Objects of a sequence are the ids 1..max of its first annotation. All values are reported in percent
(the official code writes fractions).
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from selfsup.data.labels import read_index_png

logger = logging.getLogger(__name__)

VOID = 255
BOUNDARY_TOLERANCE = 0.008
GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def region_similarity(pred: np.ndarray, gt: np.ndarray, void: np.ndarray) -> float:
    """J of one object in one frame: IoU of bool masks [H,W] outside ``void``; 1 if both are empty."""
    valid = ~void
    pred, gt = pred & valid, gt & valid
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """Boundary map of a bool mask [H,W]: a pixel is boundary where it differs from its right, bottom or
    bottom-right neighbour (last row/column compare with their one in-image neighbour)."""
    mask = mask.astype(bool)
    right, below, diag = np.zeros_like(mask), np.zeros_like(mask), np.zeros_like(mask)
    right[:, :-1], below[:-1, :], diag[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    bmap = (mask ^ right) | (mask ^ below) | (mask ^ diag)
    bmap[-1, :] = mask[-1, :] ^ right[-1, :]
    bmap[:, -1] = mask[:, -1] ^ below[:, -1]
    bmap[-1, -1] = False
    return bmap


def disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x ** 2 + y ** 2 <= radius ** 2


def boundary_tolerance(shape: Sequence[int], tolerance: float = BOUNDARY_TOLERANCE) -> int:
    """Match radius in pixels: ``tolerance`` itself when >= 1, else ceil(tolerance * diagonal)."""
    return int(tolerance) if tolerance >= 1 else int(math.ceil(tolerance * math.hypot(shape[0], shape[1])))


def boundary_f_measure(pred: np.ndarray, gt: np.ndarray, void: np.ndarray,
                       tolerance: float = BOUNDARY_TOLERANCE) -> float:
    """F of one object in one frame (bool masks [H,W])."""
    valid = ~void
    pred_b, gt_b = seg2bmap(pred & valid), seg2bmap(gt & valid)
    n_pred, n_gt = np.count_nonzero(pred_b), np.count_nonzero(gt_b)
    if n_pred == 0 or n_gt == 0:
        return 1.0 if n_pred == n_gt else 0.0  # one empty: precision or recall is 0
    footprint = disk(boundary_tolerance(pred.shape, tolerance))
    pred_near = ndimage.binary_dilation(pred_b, structure=footprint)
    gt_near = ndimage.binary_dilation(gt_b, structure=footprint)
    precision = np.count_nonzero(pred_b & gt_near) / n_pred
    recall = np.count_nonzero(gt_b & pred_near) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def statistics(values: Sequence[float], bins: int = 4) -> Tuple[float, float, float]:
    """(mean, recall = fraction > 0.5, decay = mean of the first bin - mean of the last) of per-frame values."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    # official bin edges: round(linspace(1, n, bins + 1)) - 1, bin i = v[edge_i : edge_{i+1} + 1]
    edges = (np.round(np.linspace(1, v.size, bins + 1) + 1e-10) - 1).astype(int)
    first, last = v[edges[0]:edges[1] + 1], v[edges[bins - 1]:edges[bins] + 1]
    return float(v.mean()), float((v > 0.5).mean()), float(first.mean() - last.mean())


@dataclass
class ObjectScores:
    """Per-frame J and F of one object (first and last frames already excluded)."""

    sequence: str
    object_id: int
    j: List[float]
    f: List[float]

    @property
    def name(self) -> str:
        return f"{self.sequence}_{self.object_id}"


def scored_rows(annotated: Sequence[int], num_frames: int) -> List[int]:
    """Rows of a sequence's annotations (``annotated``: their frame indices) that count: not its first or last frame."""
    return [i for i, t in enumerate(annotated) if 0 < t < num_frames - 1]


def evaluate_sequence(name: str, gt: np.ndarray, pred: np.ndarray, *, tolerance: float = BOUNDARY_TOLERANCE,
                      scored: Optional[Sequence[int]] = None) -> List[ObjectScores]:
    """J and F of every object of one sequence: ``gt`` [T,H,W] uint8 (255 void), ``pred`` [T,H,W] object ids;
    ``scored``: the rows that count (default all but the first and the last; :func:`scored_rows` when some frames
    have no annotation). Row 0 must be the first frame's annotation (its objects are the sequence's)."""
    if gt.shape != pred.shape:
        raise ValueError(f"sequence {name}: predictions {pred.shape} and annotations {gt.shape} differ in shape")
    first = gt[0][gt[0] != VOID]
    num_objects = int(first.max(initial=0))
    if int(pred.max(initial=0)) > num_objects:
        raise ValueError(f"sequence {name}: predicted object id {int(pred.max())} but the first annotation has "
                         f"only {num_objects} objects")
    scores = []
    for k in range(1, num_objects + 1):
        j, f = [], []
        for t in range(1, gt.shape[0] - 1) if scored is None else scored:  # the first and last frames do not count
            void, gt_k, pred_k = gt[t] == VOID, gt[t] == k, pred[t] == k
            j.append(region_similarity(pred_k, gt_k, void))
            f.append(boundary_f_measure(pred_k, gt_k, void, tolerance))
        scores.append(ObjectScores(name, k, j, f))
    return scores


def summarize(objects: Sequence[ObjectScores]) -> Tuple[Dict[str, float], List[Dict[str, object]]]:
    """Global results (the 7 official columns, percent) and per-object rows (Sequence, J-Mean, F-Mean)."""
    if not objects:
        raise ValueError("no objects to evaluate")
    j_stats = np.array([statistics(o.j) for o in objects]) * 100
    f_stats = np.array([statistics(o.f) for o in objects]) * 100
    j_mean, f_mean = np.nanmean(j_stats, axis=0), np.nanmean(f_stats, axis=0)
    values = [(j_mean[0] + f_mean[0]) / 2, *j_mean, *f_mean]
    global_results = {name: float(v) for name, v in zip(GLOBAL_COLUMNS, values)}
    rows = [{"Sequence": o.name, "J-Mean": float(js[0]), "F-Mean": float(fs[0])}
            for o, js, fs in zip(objects, j_stats, f_stats)]
    return global_results, rows


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row[c] if isinstance(row[c], str) else f"{row[c]:.3f}" for c in columns])


def write_results(out_dir: Union[str, Path], global_results: Mapping[str, float],
                  rows: Sequence[Mapping[str, object]], split: str = "val") -> Tuple[Path, Path]:
    """``global_results-<split>.csv`` and ``per-sequence_results-<split>.csv`` as the official evaluation names them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    global_path, sequence_path = out_dir / f"global_results-{split}.csv", out_dir / f"per-sequence_results-{split}.csv"
    _write_csv(global_path, GLOBAL_COLUMNS, [global_results])
    _write_csv(sequence_path, ("Sequence", "J-Mean", "F-Mean"), rows)
    return global_path, sequence_path


def read_predictions(results_dir: Union[str, Path], sequence: str, frame_names: Sequence[str]) -> np.ndarray:
    """Prediction PNGs ``<results_dir>/<sequence>/<frame>.png`` for every frame -> [T,H,W] uint8."""
    folder = Path(results_dir) / sequence
    missing = [n for n in frame_names if not (folder / f"{n}.png").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} prediction PNGs missing under {folder}, e.g. {missing[0]}.png "
                                "(expected the DAVIS results layout <results>/<sequence>/<frame:05d>.png)")
    return np.stack([read_index_png(folder / f"{n}.png") for n in frame_names])


def skipped_frames(dataset, indices: Optional[Sequence[int]] = None) -> Dict[str, List[str]]:
    """Frames of the ``indices`` sequences of ``dataset`` (a DAVIS2017) that have no annotation and so are not
    scored: ``{sequence: [frame names]}`` (empty when every frame is annotated)."""
    names = [dataset.sequences[i] for i in (range(len(dataset)) if indices is None else indices)]
    return {n: list(dataset.unannotated[n]) for n in names if n in dataset.unannotated}


def evaluate_results_dir(results_dir: Union[str, Path], dataset, *, indices: Optional[Sequence[int]] = None,
                         tolerance: float = BOUNDARY_TOLERANCE) -> Tuple[Dict[str, float], List[Dict[str, object]]]:
    """Evaluate a folder of DAVIS-layout predictions against the sequences of ``dataset`` (a DAVIS2017;
    ``indices``: a subset of its sequences).

    Only annotated frames are scored; the sequence's own first and last frames never count. Frames without
    annotation are logged here with their count (:func:`skipped_frames` lists them); a sequence annotated in its
    first frame only (test-dev) cannot be scored: a :class:`DataError` naming it."""
    from selfsup.data.images import DataError

    indices = range(len(dataset)) if indices is None else indices
    unscorable = [dataset.sequences[i] for i in indices if dataset.sequences[i] in dataset.first_frame_only]
    if unscorable:
        raise DataError(f"{dataset.root}: {len(unscorable)} sequences of {dataset.split} are annotated in their first "
                        f"frame only ({', '.join(unscorable[:5])}): nothing to score (a test-dev split?); the "
                        f"predictions in {results_dir} are for the DAVIS server")
    objects: List[ObjectScores] = []
    for index in indices:
        name = dataset.sequences[index]
        gt = dataset.read_annotations(index)
        frame_names = [p.stem for p in dataset.annotation_paths(index)]
        scored = scored_rows(dataset.annotated_frames(index), len(dataset.frame_paths(index)))
        objects += evaluate_sequence(name, gt, read_predictions(results_dir, name, frame_names), tolerance=tolerance,
                                     scored=scored)
    skipped = skipped_frames(dataset, indices)
    if skipped:
        count = sum(map(len, skipped.values()))
        logger.warning("DAVIS %s: %d frames of %d sequences have no annotation and are not scored: %s", dataset.split,
                       count, len(skipped), "; ".join(f"{n}: {', '.join(f)}" for n, f in list(skipped.items())[:5]))
    return summarize(objects)


def score_davis(results_dir: Union[str, Path], dataset, *, propagated: bool = True) -> Dict[str, object]:
    """What an entry point reports for the predictions in ``results_dir``: the 7 global columns (the two CSVs are
    written there), ``skipped_frames`` (frames without annotation, not scored; logged) and
    ``skipped_frames_by_sequence``. A split annotated in its first frame only (test-dev) gives ``{"scored": False}``
    after a propagation (``propagated``: the predictions are for the DAVIS server) and a :class:`DataError` when
    asked to score existing predictions."""
    if propagated and dataset.first_frame_only and len(dataset.first_frame_only) == len(dataset):
        logger.warning("DAVIS %s: every sequence is annotated in its first frame only (a test-dev split): "
                       "predictions written to %s, not scored", dataset.split, results_dir)
        return {"scored": False}
    global_results, rows = evaluate_results_dir(results_dir, dataset)
    write_results(results_dir, global_results, rows, split=dataset.split)
    skipped = skipped_frames(dataset)
    return {**global_results, "skipped_frames": sum(map(len, skipped.values())), "skipped_frames_by_sequence": skipped}
