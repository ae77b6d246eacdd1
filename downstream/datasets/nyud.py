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

from selfsup.data.catalog import DATASETS, register_layout, resolve_data_root
from selfsup.data.labels import IGNORE_INDEX, read_index_png
from selfsup.data.images import DataError
from .multitask import MultiTaskDataset, normalise_normals

NUM_CLASSES = 40
_FILES = {"semseg": ("segmentation", ".png"), "depth": ("depth", ".npy"), "normals": ("normals", ".npy"),
          "edge": ("edge", ".npy")}


register_layout("nyud", ("images", "gt_sets"),
                "images/<id>.jpg, segmentation/<id>.png, depth/<id>.npy, normals/<id>.npy, edge/<id>.npy, "
                "gt_sets/{train,val}.txt", embedded_subdir="nyud")


@DATASETS.register("nyud")
class NYUDMT(MultiTaskDataset):
    """NYUD-v2 multi-task dataset; samples as documented in ``multitask.py``."""

    TASKS = ("semseg", "depth", "normals", "edge")
    LABEL_FILES = _FILES

    def __init__(self, root: Optional[Union[str, Path]] = None, *, split: str = "train",
                 tasks: Optional[Sequence[str]] = None, transform: Optional[Callable] = None) -> None:
        super().__init__(resolve_data_root("nyud", root), split, tasks, transform)

    def split_file(self, split: str) -> Path:
        return self.root / "gt_sets" / f"{split}.txt"

    def image_path(self, sample_id: str) -> Path:
        return self.root / "images" / f"{sample_id}.jpg"

    def load_label(self, task: str, sample_id: str) -> np.ndarray:
        path = self.label_path(task, sample_id)
        if task == "semseg":
            raw = read_index_png(path).astype(np.int64)
            return np.where(raw == 0, IGNORE_INDEX, raw - 1)
        array = load_label_array(path, task)
        if task == "normals":
            return normalise_normals(array)
        if task == "depth":
            return np.where(np.isfinite(array) & (array > 0), array, 0.0).astype(np.float32)
        return array  # edge


def load_label_array(path: Path, task: str) -> np.ndarray:
    """A depth / edge map ([H,W], or [1,H,W] / [H,W,1]) or normals ([H,W,3]) as float32; anything else is a
    :class:`DataError` naming the file (a depth map of shape [H,W,3] must not be read as depth)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from None
    if array.dtype.kind not in "fiub":
        raise DataError(f"{path}: {task} must hold numbers, got dtype {array.dtype}")
    shape = tuple(array.shape)
    if task == "normals":
        ok = array.ndim == 3 and array.shape[-1] == 3
        expected = "[H,W,3] unit vectors"
    else:
        array = array.reshape(array.shape[1:]) if array.ndim == 3 and array.shape[0] == 1 else array
        array = array.reshape(array.shape[:2]) if array.ndim == 3 and array.shape[-1] == 1 else array
        ok = array.ndim == 2
        expected = "[H,W] (or [1,H,W])" + (" metres" if task == "depth" else " {0,1}")
    if not ok:
        raise DataError(f"{path}: {task} must be {expected}, got shape {shape} {array.dtype}")
    return array.astype(np.float32)
