"""PASCAL VOC 2012 semantic segmentation reader.

root/JPEGImages/<id>.jpg, root/SegmentationClass/<id>.png (palette PNG: 21 classes, 255 void),
root/ImageSets/Segmentation/{train,val}.txt. ``root`` may also be the folder holding VOCdevkit/.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from selfsup.data.catalog import DATASETS, register_layout, resolve_data_root
from selfsup.data.images import DataError, load_rgb, read_split
from selfsup.data.labels import read_index_png
from selfsup.data.classes import CLASS_NAMES

NUM_CLASSES = 21


VOC_WRAPPERS = ("VOCdevkit/VOC2012", "VOC2012", "VOCdevkit/VOC2007", "VOC2007")
register_layout("voc2012", ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"),
                "JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/{train,val}.txt "
                "(or VOCdevkit/VOC2012/ holding them)", embedded_subdir="voc2012", wrappers=VOC_WRAPPERS)
register_layout("voc07", ("JPEGImages", "ImageSets/Main"),
                "JPEGImages/<id>.jpg, ImageSets/Main/<class>_{trainval,test}.txt (or VOCdevkit/VOC2007/ holding them)",
                embedded_subdir="voc2012", wrappers=VOC_WRAPPERS)


@DATASETS.register("voc2012")
class VOC2012Segmentation(Dataset):
    """``ds[i]`` = ``(image float32 [3,H,W] in 0..1, mask int64 [H,W] with 255 void)``;
    ``transform(image, mask) -> (image, mask)`` if given. ``ids`` lists the split."""

    def __init__(self, root: Optional[Union[str, Path]] = None, *, split: str = "train",
                 transform: Optional[Callable] = None) -> None:
        self.root = resolve_data_root("voc2012", root)
        self.split = split
        self.transform = transform
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        self.ids = read_split(split_file)
        missing = [i for i in self.ids if not self.image_path(i).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.ids)} ids in {split_file} have no image, e.g. "
                                    f"{missing[:5]} (expected {self.image_path(missing[0])})")
        absent = [self.mask_path(i) for i in self.ids if not self.mask_path(i).is_file()]
        if absent:
            raise FileNotFoundError(f"missing segmentation file {absent[0]} ({len(absent)} missing)")

    def image_path(self, sample_id: str) -> Path:
        return self.root / "JPEGImages" / f"{sample_id}.jpg"

    def mask_path(self, sample_id: str) -> Path:
        return self.root / "SegmentationClass" / f"{sample_id}.png"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        sample_id = self.ids[index]
        image = torch.from_numpy(np.array(load_rgb(self.image_path(sample_id)))).permute(2, 0, 1).float() / 255
        mask = torch.from_numpy(read_index_png(self.mask_path(sample_id)).astype(np.int64))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


VOC_CLASSES = CLASS_NAMES[1:]  # the 20 object classes in VOC order


@DATASETS.register("voc07")
class VOC07Classification(Dataset):
    """VOC07-style multi-label image classification (the SVM probe's data).

    root/JPEGImages/<id>.jpg and root/ImageSets/Main/<class>_<split>.txt for the 20 classes, lines
    "<id> <label>" with label 1 (present), 0 (difficult) or -1 (absent); split ``trainval`` or ``test``.
    ``ds[i]`` = ``(transform(pil_rgb), labels int64 [20])``; ``labels`` [N, 20] holds them all.
    """

    def __init__(self, root: Optional[Union[str, Path]] = None, *, split: str = "trainval",
                 transform: Optional[Callable] = None) -> None:
        self.root = resolve_data_root("voc07", root)
        self.split, self.transform = split, transform
        columns = [self._read_list(name) for name in VOC_CLASSES]
        self.ids = list(columns[0])
        for name, column in zip(VOC_CLASSES, columns):
            if list(column) != self.ids:
                raise ValueError(f"{self._list_path(name)} lists other ids than {self._list_path(VOC_CLASSES[0])}")
        self.labels = np.array([[column[i] for column in columns] for i in self.ids], np.int64).reshape(-1, 20)
        missing = [i for i in self.ids if not (self.root / "JPEGImages" / f"{i}.jpg").is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} ids of {split} have no image under {self.root / 'JPEGImages'}, "
                                    f"e.g. {missing[:5]}")

    def _list_path(self, name: str) -> Path:
        return self.root / "ImageSets" / "Main" / f"{name}_{self.split}.txt"

    def _read_list(self, name: str) -> "dict[str, int]":
        path = self._list_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"missing {path} (expected ImageSets/Main/<class>_{self.split}.txt for the 20 "
                                    "VOC classes)")
        out = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
                raise ValueError(f"{path}:{n}: expected '<id> <1|0|-1>', got {line!r}")
            out[parts[0]] = int(parts[1])
        if not out:
            raise DataError(f"{path}: empty split list (0 ids); expected lines '<id> <1|0|-1>'")
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Tuple[object, torch.Tensor]:
        image = load_rgb(self.root / "JPEGImages" / f"{self.ids[index]}.jpg")
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.from_numpy(self.labels[index])
