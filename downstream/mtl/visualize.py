"""Prediction grids for TensorBoard: one row per image: input, then each task's prediction and GT."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from selfsup.data.labels import colourise
from downstream.datasets.mt_transforms import IMAGENET_MEAN, IMAGENET_STD

from .tasks import task_record


def render_map(task: str, value: torch.Tensor) -> np.ndarray:
    """A post-processed prediction or a label of one image -> HWC uint8."""
    v = value.detach().float().cpu()
    kind = task_record(task, what="rendering").kind
    if kind == "classes":
        return colourise(v.reshape(v.shape[-2:]).numpy().astype(np.int64))
    if kind == "normals":
        rgb = ((v.reshape(3, *v.shape[-2:]) + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
        return (rgb * 255).astype(np.uint8)
    grey = v.reshape(v.shape[-2:])
    if kind == "depth":
        grey = grey / grey.max().clamp(min=1e-6)
    grey = (grey.clamp(0, 1) * 255).numpy().astype(np.uint8)  # 255 = ignore shows white
    return np.repeat(grey[..., None], 3, axis=-1)


def denormalise(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def prediction_grid(images: torch.Tensor, predictions: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor],
                    tasks: Sequence[str], max_images: int = 4) -> np.ndarray:
    """``images`` [B,3,H,W] normalised; predictions post-processed (see metrics.postprocess). Returns HWC uint8."""
    rows: List[np.ndarray] = []
    for i in range(min(max_images, images.shape[0])):
        tiles = [denormalise(images[i])]
        for t in tasks:
            tiles += [render_map(t, predictions[t][i]), render_map(t, targets[t][i])]
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)
