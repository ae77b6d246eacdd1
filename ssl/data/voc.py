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

from .catalog import DATASETS, resolve_data_root
from .images import load_rgb
from .labels import read_index_png
from .multitask import read_split

NUM_CLASSES = 21


@DATASETS.register("voc2012")
class VOC2012Segmentation(Dataset):
    """``ds[i]`` = ``(image float32 [3,H,W] in 0..1, mask int64 [H,W] with 255 void)``;
    ``transform(image, mask) -> (image, mask)`` if given. ``ids`` lists the split."""

    def __init__(self, root: Optional[Union[str, Path]] = None, *, split: str = "train",
                 transform: Optional[Callable] = None) -> None:
        self.root = resolve_data_root("voc2012", root)
        self.split = split
        self.transform = transform
        self.ids = read_split(self.root / "ImageSets" / "Segmentation" / f"{split}.txt")
        missing = [i for i in self.ids if not self.image_path(i).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} ids of {split} have no image, e.g. {missing[:5]}")
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
