"""NYUD-v2 multi-task reader (the layout of the MTI-Net / ATRC benchmarks).

root/images/<id>.jpg, root/gt_sets/{train,val}.txt and per task:
  semseg   segmentation/<id>.png  0 = ignore, else class - 1 (40 classes) -> 255 ignore in the sample
  depth    depth/<id>.npy         metres, 0 = invalid
  normals  normals/<id>.npy       [H,W,3] unit vectors, zero = invalid
  edge     edge/<id>.npy          [H,W] {0,1}
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .catalog import DATASETS, resolve_data_root
from .labels import IGNORE_INDEX, read_index_png
from .multitask import MultiTaskDataset, normalise_normals

NUM_CLASSES = 40
_FILES = {"semseg": ("segmentation", ".png"), "depth": ("depth", ".npy"), "normals": ("normals", ".npy"),
          "edge": ("edge", ".npy")}


@DATASETS.register("nyud")
class NYUDMT(MultiTaskDataset):
    """NYUD-v2 multi-task dataset; samples as documented in ``multitask.py``."""

    TASKS = ("semseg", "depth", "normals", "edge")

    def __init__(self, root: Optional[Union[str, Path]] = None, *, split: str = "train",
                 tasks: Optional[Sequence[str]] = None, transform: Optional[Callable] = None) -> None:
        super().__init__(resolve_data_root("nyud", root), split, tasks, transform)

    def split_file(self, split: str) -> Path:
        return self.root / "gt_sets" / f"{split}.txt"

    def image_path(self, sample_id: str) -> Path:
        return self.root / "images" / f"{sample_id}.jpg"

    def label_path(self, task: str, sample_id: str) -> Path:
        folder, ext = _FILES[task]
        return self.root / folder / f"{sample_id}{ext}"

    def load_label(self, task: str, sample_id: str) -> np.ndarray:
        path = self.label_path(task, sample_id)
        if task == "semseg":
            raw = read_index_png(path).astype(np.int64)
            return np.where(raw == 0, IGNORE_INDEX, raw - 1)
        array = np.load(path).astype(np.float32)
        if task == "normals":
            return normalise_normals(array)
        array = np.squeeze(array)  # some exports store [1,H,W]
        if task == "depth":
            return np.where(np.isfinite(array) & (array > 0), array, 0.0).astype(np.float32)
        return array  # edge
