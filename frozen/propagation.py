"""DAVIS-2017 label propagation with frozen dense features (no finetuning).

For frame t, the context is the first frame (its ground truth) and the previous ``n`` predicted frames
(soft labels). Each query position of frame t scores every context position by ``(key . query) / tau`` on
L2-normalised stride-8 features; positions of the recent frames farther than ``radius`` cells (square window)
are excluded; the top-k scores over all context positions are kept, softmaxed, and the prediction is the
weighted sum of their soft labels. Predictions are upsampled to the frame size and argmaxed.
Defaults: n = 20, tau = 0.05, k = 10, radius = 12 (the reference ResNet protocol).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from selfsup.data.labels import save_palette_png
from selfsup.device import sync_device

from .features import DenseFeatures, cell_fractions, in_chunks, upsample_cells
from .figures import overlay, save_tile_rows

logger = logging.getLogger(__name__)


@dataclass
class PropagationConfig:
    context: int = 20  # previous predicted frames kept as context (besides the first frame)
    temperature: float = 0.05
    topk: int = 10
    radius: int = 12  # in feature cells, for the recent frames only
    frames_per_chunk: int = 16  # frames per forward pass of the backbone
    queries_per_chunk: int = 2048  # query positions per affinity block


def neighbourhood(h: int, w: int, radius: int, device: torch.device) -> torch.Tensor:
    """[h*w, h*w] bool: cells within ``radius`` of each other in both axes (square window)."""
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    y, x = y.reshape(-1), x.reshape(-1)
    return ((y[:, None] - y[None]).abs() <= radius) & ((x[:, None] - x[None]).abs() <= radius)


@torch.no_grad()
def propagate_labels(features: torch.Tensor, first_labels: torch.Tensor,
                     cfg: PropagationConfig = PropagationConfig()) -> torch.Tensor:
    """Soft labels of every frame.

    features: [T, C, h, w] L2-normalised; first_labels: [K, h, w] soft labels of frame 0.
    Returns [T, K, h, w] (frame 0 = ``first_labels``).
    """
    T, C, h, w = features.shape
    K, n = first_labels.shape[0], h * w
    feats = features.flatten(2).transpose(1, 2)  # [T, hw, C]
    labels = [first_labels.to(features.device).flatten(1).t()]  # [hw, K] per frame
    near = neighbourhood(h, w, cfg.radius, features.device)
    for t in range(1, T):
        recent = list(range(max(1, t - cfg.context), t))
        keys = torch.cat([feats[0]] + [feats[s] for s in recent])  # [(1+r)*hw, C]
        values = torch.cat([labels[0]] + [labels[s] for s in recent])  # [(1+r)*hw, K]
        k = min(cfg.topk, keys.shape[0])
        out = torch.empty(n, K, device=features.device)
        for q0 in range(0, n, cfg.queries_per_chunk):
            q1 = min(n, q0 + cfg.queries_per_chunk)
            scores = feats[t, q0:q1] @ keys.t() / cfg.temperature  # [q, (1+r)*hw]
            if recent:  # the first frame is not restricted; every recent frame is, with the same window
                far = ~near[q0:q1]  # [q, hw]
                scores.masked_fill_(torch.cat([torch.zeros_like(far), far.repeat(1, len(recent))], 1), float("-inf"))
            top, index = scores.topk(k, dim=1)
            weights = torch.softmax(top, dim=1)  # [q, k]
            out[q0:q1] = torch.einsum("qk,qkc->qc", weights, values[index])
        labels.append(out)
    return torch.stack(labels).transpose(1, 2).reshape(T, K, h, w)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T,H,W,3] -> float [T,3,H,W] in 0..1."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def segment_sequence(extractor: DenseFeatures, frames: np.ndarray, first_annotation: np.ndarray,
                     cfg: PropagationConfig = PropagationConfig()) -> np.ndarray:
    """Object ids [T,H,W] uint8 for ``frames`` uint8 [T,H,W,3] given the first frame's ids (255 void)."""
    H, W = first_annotation.shape
    ids = first_annotation[first_annotation != 255]
    num_classes = int(ids.max(initial=0)) + 1  # background + objects
    feats = in_chunks(frames_to_tensor(frames), extractor, cfg.frames_per_chunk)
    first = cell_fractions(torch.from_numpy(first_annotation.astype(np.int64)), num_classes, extractor.stride)
    soft = propagate_labels(feats, first, cfg)
    pred = torch.cat([upsample_cells(s, (H, W), extractor.stride).argmax(1) for s in soft.split(cfg.frames_per_chunk)])
    pred = pred.to(torch.uint8).cpu().numpy()
    pred[0] = np.where(first_annotation == 255, 0, first_annotation)  # the given frame
    return pred


def save_sequence_png(out_dir: Union[str, Path], sequence: str, frame_names: List[str], pred: np.ndarray) -> Path:
    """Palette PNGs in the DAVIS results layout ``<out>/<sequence>/<frame>.png``."""
    folder = Path(out_dir) / sequence
    folder.mkdir(parents=True, exist_ok=True)
    for name, mask in zip(frame_names, pred):
        save_palette_png(folder / f"{name}.png", mask)
    return folder


def save_sequence_picture(path: Union[str, Path], frames: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                          num: int = 4) -> Path:
    """Row 1: first frame with its ground truth, then ``num`` propagated frames; row 2: their ground truth."""
    picks = np.linspace(1, len(frames) - 1, num).round().astype(int).tolist()
    top = [("frame 0 (given)", overlay(frames[0], gt[0]))] + [(f"pred {t}", overlay(frames[t], pred[t])) for t in picks]
    bottom = [("", frames[0])] + [(f"gt {t}", overlay(frames[t], gt[t])) for t in picks]
    return save_tile_rows(path, [top, bottom])


def run_propagation(extractor: DenseFeatures, dataset, out_dir: Union[str, Path], *,
                    cfg: PropagationConfig = PropagationConfig(), indices: Optional[Sequence[int]] = None,
                    pictures: bool = True, progress: bool = True) -> Dict[str, float]:
    """Segment every sequence of ``dataset`` (DAVIS2017) into ``out_dir``; returns frames, seconds, frames/s.

    ``seconds`` counts feature extraction and propagation (not disk I/O); ``cpu_seconds`` is the process CPU
    time of the whole loop."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    frames_done, seconds, cpu_start = 0, 0.0, time.process_time()
    indices = range(len(dataset)) if indices is None else indices
    for index in tqdm(indices, desc="DAVIS propagation", unit="seq", disable=not progress):
        name = dataset.sequences[index]
        frames, gt, annotated = dataset.read_sequence(index)
        start = time.perf_counter()
        pred = segment_sequence(extractor, frames, gt[0], cfg)
        sync_device(extractor.mean.device)
        seconds += time.perf_counter() - start
        frames_done += len(frames) - 1
        save_sequence_png(out_dir, name, [p.stem for p in dataset.frame_paths(index)], pred)
        if pictures:
            save_sequence_picture(out_dir / "overlays" / f"{name}.png", frames, _pad_gt(gt, annotated, len(frames)), pred)
    return {"frames": frames_done, "seconds": seconds, "frames_per_s": frames_done / max(seconds, 1e-9),
            "cpu_seconds": time.process_time() - cpu_start}


def _pad_gt(gt: np.ndarray, annotated: Sequence[int], num_frames: int) -> np.ndarray:
    """Annotations for every frame: ``gt[i]`` is frame ``annotated[i]``'s; frames without one (test-dev ships only
    the first) are drawn empty."""
    full = np.zeros((num_frames,) + gt.shape[1:], gt.dtype)
    full[list(annotated)] = gt
    return full


def propagation_jf(extractor: DenseFeatures, dataset, *, indices: Sequence[int], max_frames: Optional[int] = None,
                   cfg: PropagationConfig = PropagationConfig()) -> Dict[str, float]:
    """J&F (percent) of the ``indices`` sequences (their first ``max_frames`` frames), in memory (no PNGs).
    Frames without annotation are propagated through, not scored (the reader logs them)."""
    from .davis_metrics import evaluate_sequence, scored_rows, summarize

    objects = []
    for index in indices:
        frames, gt, annotated = dataset.read_sequence(index)
        frames = frames[:max_frames]
        keep = [i for i, t in enumerate(annotated) if t < len(frames)]
        gt, annotated = gt[keep], [annotated[i] for i in keep]
        pred = segment_sequence(extractor, frames, gt[0], cfg)[annotated]
        objects += evaluate_sequence(dataset.sequences[index], gt, pred, scored=scored_rows(annotated, len(frames)))
    return summarize(objects)[0]
