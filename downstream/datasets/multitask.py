"""Base class of the multi-task dense datasets (PASCAL-Context, NYUD-v2).

A sample is a dict of tensors:
  'image'       float32 [3,H,W] in 0..1 (not normalised; see mt_transforms.Normalize)
  'semseg'      int64 [H,W], 255 = ignore
  'human_parts' int64 [H,W], 0..6, 255 = ignore (all 255 when the image has no person)
  'sal'         float32 [1,H,W] in {0,1}
  'normals'     float32 [3,H,W] unit vectors, (0,0,0) = invalid
  'edge'        float32 [1,H,W] in {0,1}
  'depth'       float32 [1,H,W] metres, 0 = invalid
  'meta'        {'id': str, 'size': (H, W)} (the original size, for evaluation at full resolution)
Only the requested ``tasks`` are loaded. ``transform`` (mt_transforms) maps the dict to a dict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from selfsup.data.images import DataError, load_rgb, read_split
from selfsup.data.preview import save_sample_grid


class MultiTaskDataset(Dataset):
    """Subclasses set ``TASKS`` and ``LABEL_FILES`` (task -> (folder, extension) under the root: the label of a
    sample is ``<folder>/<id><extension>``) and implement ``split_file``, ``image_path`` and ``load_label``
    (returning numpy arrays [H,W] or [H,W,C])."""

    TASKS: Sequence[str] = ()
    LABEL_FILES: Mapping[str, Tuple[str, str]] = {}

    def __init__(self, root: Path, split: str, tasks: Optional[Sequence[str]], transform: Optional[Callable]) -> None:
        self.root = Path(root)
        self.split = split
        self.tasks = list(self.TASKS if tasks is None else tasks)
        unknown = [t for t in self.tasks if t not in self.TASKS]
        if unknown:
            raise KeyError(f"unknown tasks {unknown} for {type(self).__name__}; known: {', '.join(self.TASKS)}")
        self.transform = transform
        self.ids = read_split(self.split_file(split))
        missing = [i for i in self.ids if not self.image_path(i).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.ids)} ids in {self.split_file(split)} have no image, "
                f"e.g. {missing[:5]} (expected {self.image_path(missing[0])})")
        for task in self.tasks:
            absent = [p for p in (self.label_path(task, i) for i in self.ids) if not p.is_file()]
            if absent:
                raise FileNotFoundError(f"missing {task} label file {absent[0]} ({len(absent)} missing for this split)")

    # --- to implement -------------------------------------------------------------------------
    def split_file(self, split: str) -> Path:
        raise NotImplementedError

    def image_path(self, sample_id: str) -> Path:
        raise NotImplementedError

    def label_path(self, task: str, sample_id: str) -> Path:
        folder, ext = self.LABEL_FILES[task]
        return self.root / folder / f"{sample_id}{ext}"

    def load_label(self, task: str, sample_id: str) -> np.ndarray:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, object]:
        sample_id = self.ids[index]
        image = np.asarray(load_rgb(self.image_path(sample_id)))
        sample: Dict[str, object] = {"image": torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255}
        for task in self.tasks:
            label = self.load_label(task, sample_id)
            if label.shape[:2] != image.shape[:2]:
                raise DataError(f"{self.label_path(task, sample_id)}: size {label.shape[:2]} != image {image.shape[:2]}")
            sample[task] = to_tensor(task, label)
        sample["meta"] = {"id": sample_id, "size": tuple(image.shape[:2])}
        return self.transform(sample) if self.transform is not None else sample


def to_tensor(task: str, label: np.ndarray) -> torch.Tensor:
    """Numpy label -> tensor in the sample format (see module docstring)."""
    if task in ("semseg", "human_parts"):
        return torch.from_numpy(label.astype(np.int64))
    if task == "normals":
        return torch.from_numpy(np.ascontiguousarray(label.transpose(2, 0, 1), dtype=np.float32))
    return torch.from_numpy(label.astype(np.float32)[None])


def normalise_normals(normals: np.ndarray) -> np.ndarray:
    """Rescale valid vectors to unit length; vectors of (near) zero length become (0,0,0) = invalid."""
    norm = np.linalg.norm(normals, axis=-1, keepdims=True)
    return np.where(norm > 1e-3, normals / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


def save_dataset_preview(root: Union[str, Path], path: Union[str, Path], *, num: int = 3, cell: int = 128) -> Path:
    """Grid of ``num`` PASCAL-Context and ``num`` NYUD samples from an embedded/real data root."""
    from .nyud import NYUDMT
    from .pascal_context import PascalContextMT

    root = Path(root)
    pascal = PascalContextMT(root / "pascal_context", split="train")
    nyud = NYUDMT(root / "nyud", split="train")
    samples = [pascal[i] for i in range(min(num, len(pascal)))] + [nyud[i] for i in range(min(num, len(nyud)))]
    return save_sample_grid(path, samples, cell=cell, title="PASCAL-Context (top), NYUD-v2 (bottom)")
