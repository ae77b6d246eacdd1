"""DAVIS-2017 semi-supervised video object segmentation reader.

root/JPEGImages/<res>/<seq>/<frame:05d>.jpg, root/Annotations/<res>/<seq>/<frame:05d>.png (palette
PNG: index = object id, 0 background, 255 void), root/ImageSets/2017/{train,val}.txt.

Frames and annotations are matched per sequence when the reader is built (a directory listing, no decoding):

* an error (:class:`DataError`, one line naming the sequences and frames): a sequence without frames or without
  annotations, an annotation without its frame, a first frame without annotation (propagation starts from it),
  a gap in the frame numbering (a deleted frame: propagation would jump over it);
* a counted warning: frames without annotation after the first (``unannotated``): they are propagated through
  but not scored; the scorer reports them (``skipped_frames`` in davis_propagation.py's results.json);
* a sequence annotated in its first frame only (test-dev ships no more) is listed in ``first_frame_only``:
  it can be propagated, not scored.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
from torch.utils.data import Dataset

from selfsup.data.catalog import DATASETS, register_layout, resolve_data_root
from selfsup.data.images import DataError, load_rgb, read_split
from selfsup.data.labels import read_index_png


register_layout("davis2017", ("JPEGImages", "ImageSets/2017"),
                "JPEGImages/480p/<seq>/<frame:05d>.jpg, Annotations/480p/<seq>/<frame:05d>.png, "
                "ImageSets/2017/{train,val}.txt", embedded_subdir="davis2017", wrappers=("DAVIS",))

logger = logging.getLogger(__name__)


def _some(names: List[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" ... (+{len(names) - n} more)" if len(names) > n else "")


@DATASETS.register("davis2017")
class DAVIS2017(Dataset):
    """One item per sequence: ``{'name', 'frames': [Path], 'annotations': [Path]}``.

    ``annotations`` may be shorter than ``frames`` (test-dev ships the first frame only; see the module doc).
    ``read_frames(i)`` -> uint8 [T,H,W,3]; ``read_annotations(i)`` -> uint8 [T',H,W] object ids of the annotated
    frames ``annotated_frames(i)`` (indices into the frames; 0 is always among them).
    """

    def __init__(self, root: Optional[Union[str, Path]] = None, *, split: str = "val", resolution: str = "480p") -> None:
        self.root = resolve_data_root("davis2017", root)
        self.split = split
        self.resolution = resolution
        self.sequences = read_split(self.root / "ImageSets" / "2017" / f"{split}.txt")
        missing = [s for s in self.sequences if not (self.root / "JPEGImages" / resolution / s).is_dir()]
        if missing:
            raise DataError(f"{len(missing)} sequences of {split} have no frame folder under "
                            f"{self.root / 'JPEGImages' / resolution}, e.g. {missing[:5]}")
        self.unannotated: Dict[str, List[str]] = {}  # sequence -> frames without annotation (not scored)
        self.first_frame_only: List[str] = []
        self._annotated: List[List[int]] = []
        problems = []
        for index in range(len(self.sequences)):
            annotated, problem = self._match(index)
            self._annotated.append(annotated)
            if problem:
                problems.append(f"{self.sequences[index]}: {problem}")
        if problems:
            raise DataError(f"{self.root}: {len(problems)} of {len(self.sequences)} DAVIS {split} sequences have "
                            f"missing or mismatched files: {'; '.join(problems[:4])}"
                            + (f"; ... (+{len(problems) - 4} more)" if len(problems) > 4 else ""))
        for name, frames in self.unannotated.items():
            logger.warning("DAVIS %s: sequence %s: %d frames have no annotation (%s): propagated, not scored",
                           split, name, len(frames), _some(frames))

    def _match(self, index: int) -> Tuple[List[int], str]:
        """(annotated frame indices, '' or what is wrong) of one sequence."""
        name = self.sequences[index]
        frame_dir, ann_dir = (self.root / kind / self.resolution / name for kind in ("JPEGImages", "Annotations"))
        frames = [p.stem for p in self.frame_paths(index)]
        annotations = [p.stem for p in self.annotation_paths(index)]
        if not frames:
            return [], f"no .jpg frames in {frame_dir}"
        if not annotations:
            return [], f"no .png annotations in {ann_dir}"
        position = {f: i for i, f in enumerate(frames)}
        orphans = [a for a in annotations if a not in position]
        if orphans:
            return [], (f"{len(orphans)} annotations have no frame: {_some(orphans)} "
                        f"(no {frame_dir / (orphans[0] + '.jpg')}; {len(frames)} frames, {len(annotations)} annotations)")
        if all(f.isdigit() for f in frames):
            numbers = [int(f) for f in frames]
            gaps = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
            if gaps:
                width = len(frames[0])
                return [], (f"{len(gaps)} frames missing from the numbering {frames[0]}..{frames[-1]}: "
                            f"{_some([str(g).zfill(width) for g in gaps])} (no {frame_dir / (str(gaps[0]).zfill(width) + '.jpg')})")
        if annotations[0] != frames[0]:
            return [], f"the first frame {frames[0]} has no annotation (no {ann_dir / (frames[0] + '.png')}); propagation starts from it"
        annotated = sorted(position[a] for a in annotations)
        if len(annotated) == 1 and len(frames) > 1:
            self.first_frame_only.append(name)
        elif len(annotated) < len(frames):
            self.unannotated[name] = [f for f in frames if f not in set(annotations)]
        return annotated, ""

    def __len__(self) -> int:
        return len(self.sequences)

    def frame_paths(self, index: int) -> List[Path]:
        return sorted((self.root / "JPEGImages" / self.resolution / self.sequences[index]).glob("*.jpg"))

    def annotation_paths(self, index: int) -> List[Path]:
        return sorted((self.root / "Annotations" / self.resolution / self.sequences[index]).glob("*.png"))

    def annotated_frames(self, index: int) -> List[int]:
        """Indices (into ``frame_paths(index)``) of the annotated frames, in order; the first is 0."""
        return list(self._annotated[index])

    def __getitem__(self, index: int) -> Dict[str, object]:
        return {"name": self.sequences[index], "frames": self.frame_paths(index),
                "annotations": self.annotation_paths(index)}

    def read_frames(self, index: int) -> np.ndarray:
        paths = self.frame_paths(index)
        frames = [np.asarray(load_rgb(p)) for p in paths]
        for path, frame in zip(paths, frames):
            if frame.shape != frames[0].shape:
                raise DataError(f"{path}: frame of size {frame.shape[:2]} in a sequence of {frames[0].shape[:2]} "
                                f"({paths[0].name})")
        return np.stack(frames)

    def read_annotations(self, index: int) -> np.ndarray:
        paths = self.annotation_paths(index)
        masks = [read_index_png(p) for p in paths]
        for path, mask in zip(paths, masks):
            if mask.shape != masks[0].shape:
                raise DataError(f"{path}: annotation of size {mask.shape} in a sequence of {masks[0].shape} "
                                f"({paths[0].name})")
        return np.stack(masks)

    def read_sequence(self, index: int) -> Tuple[np.ndarray, np.ndarray, List[int]]:
        """(frames uint8 [T,H,W,3], annotations uint8 [T',H,W], annotated frame indices [T']); frames and
        annotations of another size are a :class:`DataError` naming the files."""
        frames, annotations = self.read_frames(index), self.read_annotations(index)
        if frames.shape[1:3] != annotations.shape[1:3]:
            raise DataError(f"{self.annotation_paths(index)[0]}: annotations of size {annotations.shape[1:3]} but "
                            f"frames of {frames.shape[1:3]} ({self.frame_paths(index)[0]})")
        return frames, annotations, self.annotated_frames(index)

    def num_objects(self, index: int) -> int:
        """Objects in the first annotated frame (ids 1..n; 255 void is not an object)."""
        first = read_index_png(self.annotation_paths(index)[0])
        ids = np.unique(first)
        return int(ids[(ids > 0) & (ids < 255)].max(initial=0))
