"""VOC semantic segment retrieval with frozen dense features (no finetuning).

Per image, K-Means (K = 15, spherical, seeded) on the L2-normalised pixel embeddings (stride-8 features
upsampled to the image, renormalised) gives segments; a segment's descriptor is its normalised mean
embedding. Train segments take their majority ground-truth class (void excluded; all-void segments are
dropped). Every val segment takes the class of its nearest train segment (cosine, ``faiss.IndexFlatIP``).
mIoU from dataset-level TP/FP/FN over the 21 classes, and over the 7-class subset {aeroplane, bottle, bus,
car, cat, cow, person}: ground truth of the other 13 object classes is void and only those 7 IoUs are
averaged (background stays a class that predictions can be confused with).

faiss: one code path for CPU and GPU builds (GPU resources only when ``faiss.get_num_gpus() > 0``);
inputs are C-contiguous float32.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from frozen.voc import CLASS_NAMES
from .miou import SegmentationMeter

NUM_CLASSES = 21
VOID = 255
SUBSET_7 = ("aeroplane", "bottle", "bus", "car", "cat", "cow", "person")
SUBSET_7_IDS = tuple(CLASS_NAMES.index(name) for name in SUBSET_7)


def faiss_gpu() -> bool:
    import faiss

    return faiss.get_num_gpus() > 0


def _contiguous(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def inner_product_index(vectors: np.ndarray):
    """A ``faiss.IndexFlatIP`` holding ``vectors`` [N, D], on the GPUs when faiss has any."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    if faiss_gpu():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(_contiguous(vectors))
    return index


@dataclass
class Segments:
    """Segments of one image: ``assignment`` [H,W] segment index, ``descriptors`` [S, D] unit vectors."""

    assignment: np.ndarray
    descriptors: np.ndarray


def kmeans_segments(embeddings: np.ndarray, *, k: int = 15, seed: int = 0, iterations: int = 20,
                    fit_stride: int = 1) -> Segments:
    """Spherical K-Means of the pixel embeddings [D, H, W] (unit vectors) into at most ``k`` segments.

    The centroids are fitted on every ``fit_stride``-th pixel in both axes (all of them by default), then
    every pixel joins its nearest centroid; empty clusters are dropped."""
    import faiss

    D, H, W = embeddings.shape
    x = _contiguous(embeddings.reshape(D, -1).T)  # [HW, D]
    fit = _contiguous(embeddings[:, ::fit_stride, ::fit_stride].reshape(D, -1).T) if fit_stride > 1 else x
    k = min(k, fit.shape[0])
    kmeans = faiss.Kmeans(D, k, niter=iterations, seed=seed, spherical=True, gpu=faiss_gpu(),
                          min_points_per_centroid=1, max_points_per_centroid=fit.shape[0])  # no subsampling
    kmeans.train(fit)
    _, assign = kmeans.index.search(x, 1)
    used, assign = np.unique(assign[:, 0], return_inverse=True)
    sums = np.eye(len(used), dtype=np.float32)[assign].T @ x  # [S, D] sum of each segment's embeddings
    descriptors = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return Segments(assign.reshape(H, W), descriptors.astype(np.float32))


def majority_labels(segments: Segments, gt: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Majority ground-truth class of every segment (void excluded); -1 for all-void segments."""
    valid = gt != VOID
    num_segments = segments.descriptors.shape[0]
    index = segments.assignment[valid].astype(np.int64) * num_classes + gt[valid].astype(np.int64)
    counts = np.bincount(index, minlength=num_segments * num_classes).reshape(num_segments, num_classes)
    return np.where(counts.sum(1) > 0, counts.argmax(1), -1)


def pixel_embeddings(dense: torch.Tensor, size: Tuple[int, int], stride: int) -> np.ndarray:
    """[D, h, w] stride-``stride`` features -> unit pixel embeddings [D, H, W] (bilinear, renormalised)."""
    up = F.interpolate(dense[None], scale_factor=stride, mode="bilinear", align_corners=False)[0, :, :size[0], :size[1]]
    return F.normalize(up, dim=0).cpu().numpy()


def _subset_gt(gt: np.ndarray, keep: Sequence[int]) -> np.ndarray:
    out = gt.copy()
    out[~np.isin(gt, (0,) + tuple(keep)) & (gt != VOID)] = VOID
    return out


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU (nan for classes absent from ground truth and prediction) of a [gt, pred] confusion."""
    tp = np.diag(confusion).astype(np.float64)
    denom = confusion.sum(0) + confusion.sum(1) - tp
    return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)


Item = Tuple[np.ndarray, np.ndarray]  # (pixel embeddings [D,H,W], ground truth [H,W] with 255 void)


def retrieval_miou(train: Iterable[Item], val: Iterable[Item], *, k: int = 15, seed: int = 0, fit_stride: int = 1,
                   keep_predictions: int = 0) -> Dict[str, object]:
    """Segment retrieval mIoU (percent): ``miou_21``, ``miou_7``, per-class IoUs, and the first
    ``keep_predictions`` val images' (segments, prediction) for figures."""
    descriptors, labels, num_train = [], [], 0
    for embeddings, gt in train:
        num_train += 1
        segments = kmeans_segments(embeddings, k=k, seed=seed, fit_stride=fit_stride)
        seg_labels = majority_labels(segments, gt)
        descriptors.append(segments.descriptors[seg_labels >= 0])
        labels.append(seg_labels[seg_labels >= 0])
    if not sum(len(lab) for lab in labels):
        from selfsup.data.images import DataError
        raise DataError(f"no train segment has a labelled pixel: the ground truth of all {num_train} train images "
                        f"is void (255)" if num_train else "no train images")
    bank_labels = np.concatenate(labels)
    index = inner_product_index(np.concatenate(descriptors))
    meter21, meter7 = SegmentationMeter(NUM_CLASSES), SegmentationMeter(NUM_CLASSES)
    kept: List[Tuple[Segments, np.ndarray]] = []
    for embeddings, gt in val:
        segments = kmeans_segments(embeddings, k=k, seed=seed, fit_stride=fit_stride)
        _, nearest = index.search(_contiguous(segments.descriptors), 1)
        pred = bank_labels[nearest[:, 0]][segments.assignment]
        meter21.update(torch.from_numpy(pred), torch.from_numpy(gt.astype(np.int64)))
        meter7.update(torch.from_numpy(pred), torch.from_numpy(_subset_gt(gt, SUBSET_7_IDS).astype(np.int64)))
        if len(kept) < keep_predictions:
            kept.append((segments, pred))
    iou21, iou7 = class_iou(meter21.confusion), class_iou(meter7.confusion)[list(SUBSET_7_IDS)]
    return {
        "miou_21": 100.0 * float(np.nanmean(iou21)) if np.isfinite(iou21).any() else 0.0,
        "miou_7": 100.0 * float(np.nanmean(iou7)) if np.isfinite(iou7).any() else 0.0,
        "iou_per_class": {CLASS_NAMES[c]: (None if np.isnan(v) else 100.0 * float(v)) for c, v in enumerate(iou21)},
        "train_segments": int(len(bank_labels)), "predictions": kept,
    }


def voc_embeddings(extractor, dataset, indices: Sequence[int], desc: str = "") -> Iterator[Item]:
    """(pixel embeddings, ground truth) of ``dataset`` (VOC2012Segmentation) items through a ``DenseFeatures``."""
    from tqdm import tqdm

    for i in tqdm(indices, desc=desc, unit="img", disable=not desc):
        image, gt = dataset[i]
        yield pixel_embeddings(extractor(image[None])[0], tuple(gt.shape), extractor.stride), gt.numpy()


def run_retrieval(extractor, train_set, val_set, *, k: int = 15, seed: int = 0, max_images: Optional[int] = None,
                  fit_stride: int = 1, figure: Optional[str] = None, progress: bool = True) -> Dict[str, object]:
    """Segment retrieval of ``val_set`` against ``train_set`` (the first ``max_images`` of each if given);
    adds ``images_per_s`` (train + val images over the whole run; ``cpu_seconds`` its process CPU time) and saves a figure of 4 val images."""
    picks = [list(range(len(ds) if max_images is None else min(max_images, len(ds)))) for ds in (train_set, val_set)]
    start, cpu_start = time.perf_counter(), time.process_time()
    result = retrieval_miou(voc_embeddings(extractor, train_set, picks[0], "train images" if progress else ""),
                            voc_embeddings(extractor, val_set, picks[1], "val images" if progress else ""),
                            k=k, seed=seed, fit_stride=fit_stride, keep_predictions=4 if figure else 0)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    kept = result.pop("predictions")
    if figure:
        save_retrieval_figure(figure, val_set, kept)
    images = len(picks[0]) + len(picks[1])
    return {**result, "images": images, "seconds": seconds, "images_per_s": images / max(seconds, 1e-9),
            "cpu_seconds": cpu_seconds}


def save_retrieval_figure(path: str, dataset, kept: Sequence[Tuple[Segments, np.ndarray]]) -> None:
    """One row per image: image, its K-Means segments, the retrieved labels, the ground truth."""
    from selfsup.data.labels import colourise

    from .figures import overlay, save_tile_rows

    rows = []
    for i, (segments, pred) in enumerate(kept):
        image, gt = dataset[i]
        rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        rows.append([("image", rgb), ("segments", colourise(segments.assignment + 1)),
                     ("retrieved", overlay(rgb, pred)), ("ground truth", overlay(rgb, np.where(gt == VOID, 0, gt)))])
    save_tile_rows(path, rows)
