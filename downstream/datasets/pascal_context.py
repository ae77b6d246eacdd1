"""PASCAL-Context multi-task reader (the PASCAL_MT layout of the multi-task benchmarks).

root/JPEGImages/<id>.jpg, root/ImageSets/Context/{train,val}.txt and per task:
  semseg       semseg/pascal-context/<id>.png   21 classes, 255 ignore
  human_parts  human_parts/<id>.mat             PASCAL-Part ``anno`` struct (read below)
  normals      normals_distill/<id>.png         uint8 RGB, 2x/255-1; valid only where the ``LabelMap`` label is
                                                one of the 170 NYU-compatible ids (reference/*.tsv), else (0,0,0)
  sal          sal_distill/<id>.png             /255, > 0.5 = salient
  edge         pascal-context/trainval/<id>.mat ``LabelMap``; edge = bwmorph(seg2bmap(LabelMap), 'thin')

PASCAL-Part ``anno`` (loadmat): ``anno[0,0]['objects']`` is a 1xN struct array with fields
``class`` (str), ``class_ind`` (15 = person), ``mask``, ``parts``; ``parts`` is a 1xP struct array
with ``part_name`` and ``mask``. Person part names are grouped into 6 parts (PART_GROUPS); pixels of
no part are 0 (background). Only persons with part annotations define the map (as the published
multi-task code reads it): an image without such a person is all 255, pixels of a person without
parts are background.
"""
from __future__ import annotations

from pathlib import Path
from functools import lru_cache
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Union

import numpy as np
import scipy.io
from PIL import Image

from selfsup.data.catalog import DATASETS, register_layout, resolve_data_root
from selfsup.data.labels import IGNORE_INDEX, label_edges, read_index_png
from .multitask import MultiTaskDataset, normalise_normals

PERSON_CLASS_IND = 15
# PASCAL-Part person part names -> 1 head, 2 torso, 3 upper arm, 4 lower arm, 5 upper leg, 6 lower leg
PART_GROUPS: Dict[str, int] = {
    "head": 1, "hair": 1, "leye": 1, "reye": 1, "lear": 1, "rear": 1, "lebrow": 1, "rebrow": 1,
    "nose": 1, "mouth": 1, "torso": 2, "neck": 2, "luarm": 3, "ruarm": 3, "llarm": 4, "rlarm": 4,
    "lhand": 4, "rhand": 4, "luleg": 5, "ruleg": 5, "llleg": 6, "rlleg": 6, "lfoot": 6, "rfoot": 6,
}
REFERENCE = Path(__file__).parent / "reference"
_FILES = {
    "semseg": ("semseg/pascal-context", ".png"), "human_parts": ("human_parts", ".mat"),
    "normals": ("normals_distill", ".png"), "sal": ("sal_distill", ".png"),
    "edge": ("pascal-context/trainval", ".mat"),
}


@lru_cache(maxsize=1)
def normals_valid_labels() -> FrozenSet[int]:
    """The 170 ``LabelMap`` ids (459-class labelling) on which the distilled normals count (published code)."""
    lines = (REFERENCE / "pascal_context_normals_valid_labels.tsv").read_text().splitlines()[1:]
    return frozenset(int(line.split("\t")[0]) for line in lines if line.strip())


@lru_cache(maxsize=1)
def edge_test_ids() -> FrozenSet[str]:
    """The 2,498 val ids of the SEISM ``test_new`` subset, on which the published edge ODS is computed."""
    return frozenset((REFERENCE / "pascal_context_edge_test_ids.txt").read_text().split())


def read_label_map(path: Union[str, Path]) -> np.ndarray:
    """``LabelMap`` of a PASCAL-Context ``trainval/<id>.mat``: [H,W] integer label ids."""
    return np.asarray(scipy.io.loadmat(path)["LabelMap"])


def read_human_parts(path: Union[str, Path], shape) -> np.ndarray:
    """PASCAL-Part .mat -> [H,W] uint8 part map (0 background, 1..6 parts; all 255 when no person has parts)."""
    anno = scipy.io.loadmat(path)["anno"][0, 0]
    target = None
    for obj in anno["objects"].ravel():
        if int(np.squeeze(obj["class_ind"])) != PERSON_CLASS_IND or obj["parts"].size == 0:
            continue  # persons without part annotations do not define the map
        if target is None:
            target = np.zeros(shape, np.uint8)
        for part in obj["parts"].ravel():
            name = str(np.squeeze(part["part_name"]))
            target[np.asarray(part["mask"]) > 0] = PART_GROUPS[name]
    return target if target is not None else np.full(shape, IGNORE_INDEX, np.uint8)


register_layout("pascal_context", ("JPEGImages", "ImageSets/Context"),
                "JPEGImages/<id>.jpg, ImageSets/Context/{train,val}.txt, semseg/pascal-context/<id>.png, "
                "human_parts/<id>.mat, normals_distill/<id>.png, sal_distill/<id>.png, "
                "pascal-context/trainval/<id>.mat", embedded_subdir="pascal_context")


@DATASETS.register("pascal_context")
class PascalContextMT(MultiTaskDataset):
    """PASCAL-Context multi-task dataset; samples as documented in ``multitask.py``."""

    TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
    LABEL_FILES = _FILES

    def __init__(self, root: Optional[Union[str, Path]] = None, *, split: str = "train",
                 tasks: Optional[Sequence[str]] = None, transform: Optional[Callable] = None) -> None:
        super().__init__(resolve_data_root("pascal_context", root), split, tasks, transform)

    def split_file(self, split: str) -> Path:
        return self.root / "ImageSets" / "Context" / f"{split}.txt"

    def image_path(self, sample_id: str) -> Path:
        return self.root / "JPEGImages" / f"{sample_id}.jpg"

    def load_label(self, task: str, sample_id: str) -> np.ndarray:
        path = self.label_path(task, sample_id)
        if task == "semseg":
            return read_index_png(path)
        if task == "human_parts":
            with Image.open(self.image_path(sample_id)) as image:
                shape = image.size[::-1]
            return read_human_parts(path, shape)
        if task == "normals":
            code = np.asarray(Image.open(path).convert("RGB"))
            normals = 2.0 * code.astype(np.float32) / 255.0 - 1.0
            labels = read_label_map(self.label_path("edge", sample_id))
            valid = np.isin(labels, list(normals_valid_labels()))[..., None] & code.any(-1, keepdims=True)
            return normalise_normals(np.where(valid, normals, 0.0))
        if task == "sal":
            return (np.asarray(Image.open(path).convert("L"), np.float32) / 255.0 > 0.5).astype(np.float32)
        if task == "edge":
            return label_edges(read_label_map(path)).astype(np.float32)
        raise KeyError(task)
