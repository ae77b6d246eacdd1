"""DAVIS-2017 semi-supervised video object segmentation reader.

root/JPEGImages/<res>/<seq>/<frame:05d>.jpg, root/Annotations/<res>/<seq>/<frame:05d>.png (palette
PNG: index = object id, 0 background, 255 void), root/ImageSets/2017/{train,val}.txt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
from torch.utils.data import Dataset

from selfsup.data.catalog import DATASETS, register_layout, resolve_data_root
from selfsup.data.images import load_rgb, read_split
from selfsup.data.labels import read_index_png


register_layout("davis2017", ("JPEGImages", "ImageSets/2017"),
                "JPEGImages/480p/<seq>/<frame:05d>.jpg, Annotations/480p/<seq>/<frame:05d>.png, "
                "ImageSets/2017/{train,val}.txt", embedded_subdir="davis2017", wrappers=("DAVIS",))


@DATASETS.register("davis2017")
class DAVIS2017(Dataset):
    """One item per sequence: ``{'name', 'frames': [Path], 'annotations': [Path]}``.

    ``annotations`` may be shorter than ``frames`` (test-dev ships the first frame only).
    ``read_frames(i)`` -> uint8 [T,H,W,3]; ``read_annotations(i)`` -> uint8 [T',H,W] object ids.
    """

    def __init__(self, root: Optional[Union[str, Path]] = None, *, split: str = "val", resolution: str = "480p") -> None:
        self.root = resolve_data_root("davis2017", root)
        self.split = split
        self.resolution = resolution
        self.sequences = read_split(self.root / "ImageSets" / "2017" / f"{split}.txt")
        missing = [s for s in self.sequences if not (self.root / "JPEGImages" / resolution / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} sequences of {split} have no frame folder under "
                                    f"{self.root / 'JPEGImages' / resolution}, e.g. {missing[:5]}")

    def __len__(self) -> int:
        return len(self.sequences)

    def frame_paths(self, index: int) -> List[Path]:
        return sorted((self.root / "JPEGImages" / self.resolution / self.sequences[index]).glob("*.jpg"))

    def annotation_paths(self, index: int) -> List[Path]:
        return sorted((self.root / "Annotations" / self.resolution / self.sequences[index]).glob("*.png"))

    def __getitem__(self, index: int) -> Dict[str, object]:
        name = self.sequences[index]
        frames, annotations = self.frame_paths(index), self.annotation_paths(index)
        if not frames:
            raise FileNotFoundError(f"no frames for sequence {name}")
        if not annotations:
            raise FileNotFoundError(f"no annotation for sequence {name} under {self.root / 'Annotations' / self.resolution / name}")
        return {"name": name, "frames": frames, "annotations": annotations}

    def read_frames(self, index: int) -> np.ndarray:
        return np.stack([np.asarray(load_rgb(p)) for p in self.frame_paths(index)])

    def read_annotations(self, index: int) -> np.ndarray:
        return np.stack([read_index_png(p) for p in self.annotation_paths(index)])

    def num_objects(self, index: int) -> int:
        """Objects in the first annotated frame (ids 1..n; 255 void is not an object)."""
        first = read_index_png(self.annotation_paths(index)[0])
        ids = np.unique(first)
        return int(ids[(ids > 0) & (ids < 255)].max(initial=0))
