"""Image-folder datasets: unlabelled images for pretraining (``images``, ``coco``) and a labelled
``root/<split>/<class>/`` set (``classification``) for kNN monitors and linear probes.

Unreadable images are skipped: the next readable file is returned instead and the bad file is
recorded in a shared byte array, so ``num_skipped`` counts distinct bad files across DataLoader
worker processes (and a known-bad file is not decoded again).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .catalog import DATASETS, resolve_data_root

logger = logging.getLogger(__name__)
T = TypeVar("T")

IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png")


class DataError(ValueError):
    """A data file is unreadable or malformed (or none is readable); the message names the file or folder."""


def list_images(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[Path]:
    """All image files below ``folder``, sorted by relative path (deterministic order)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(tuple(extensions))]
    return [Path(p) for p in sorted(found)]


def read_split(path: Path) -> List[str]:
    """The ids of a split file (one per line, blank lines skipped): the readers' ``ImageSets/.../<split>.txt``; a
    missing file or one without ids is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{path}: empty split list (0 ids); expected one id per line")
    return ids


def _opens_as_image(path: Union[str, Path]) -> bool:
    """PIL identifies the file as an image (its header only: no decoding)."""
    try:
        with Image.open(path):
            return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _listing(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n} more)" if len(names) > n else "")


def require_images(folder: Union[str, Path], files: Sequence[Union[str, Path]],
                   extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
    """:class:`DataError` ``<folder>: 0 of N files are images: a.txt, b.bin, ...`` when no file of ``files`` (the
    image files found below ``folder``) opens as an image. Headers are read in order up to the first image, so a
    usual folder costs one file open; unreadable files after it are skipped and counted while reading."""
    if any(_opens_as_image(f) for f in files):
        return
    folder = Path(folder)
    everything = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        everything += [os.path.relpath(os.path.join(dirpath, f), folder) for f in filenames if not f.startswith(".")]
    everything.sort()
    expected = f"expected {'/'.join(extensions)} files that decode"
    if not everything:
        raise DataError(f"{folder}: no files ({expected})")
    found = set(os.path.relpath(str(f), folder) for f in files)
    named = [f"{n} (not an image)" if n in found else n for n in everything]
    raise DataError(f"{folder}: 0 of {len(everything)} files are images ({expected}): {_listing(named)}")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16/32-bit grey images (16-bit PNGs open as mode ``I;16`` or ``I``) are scaled to 0..255:
    PIL's own conversion clips them, turning nearly every pixel white."""
    if image.mode.startswith("I") and image.mode != "I;8" or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else values.max()
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 [H,W]: mode L
    return image.convert("RGB")


def load_rgb(path: Union[str, Path]) -> Image.Image:
    """Decode fully (so truncated files fail here, not later in a transform) and convert to RGB."""
    with Image.open(path) as image:
        return to_rgb(image)


class SkippedFiles:
    """Skip-and-count of unreadable files, shared by all DataLoader workers.

    One flag per file lives in shared memory (inherited by forked and spawned workers; lock-free:
    workers only ever set a flag to 1), so ``num_skipped`` counts distinct bad files in any process.
    """

    ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

    def __init__(self, files: Sequence[Union[str, Path]]) -> None:
        if not files:
            raise FileNotFoundError("no images found")
        self.files = list(files)
        self._bad = multiprocessing.RawArray("b", len(self.files))

    @property
    def num_skipped(self) -> int:
        return int(np.frombuffer(self._bad, np.int8).sum())

    @property
    def skipped_files(self) -> List[Union[str, Path]]:
        return [self.files[i] for i in np.flatnonzero(np.frombuffer(self._bad, np.int8))]

    def read(self, index: int, load: Callable[[Any], T]) -> Tuple[T, int]:
        """(``load(file)``, file index actually read): ``index`` or the next readable file after it."""
        for step in range(len(self.files)):
            j = (index + step) % len(self.files)
            if self._bad[j]:
                continue
            try:
                return load(self.files[j]), j
            except self.ERRORS as error:
                self._bad[j] = 1
                logger.warning("skipping unreadable image %s (%s); %d skipped so far", self.files[j], error,
                               self.num_skipped)
        folder = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in self.files])
        raise DataError(f"none of the {len(self.files)} images below {folder} is readable (e.g. {self.files[0]}); "
                        f"expected JPEG or PNG files")


class _SkippingImageFiles(Dataset):
    """Base: ``files`` with skip-and-count of unreadable images."""

    def __init__(self, files: List[Path], transform: Optional[Callable] = None) -> None:
        self.skipped = SkippedFiles(files)
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files met so far, in any process."""
        return self.skipped.num_skipped

    @property
    def skipped_files(self) -> List[Path]:
        return self.skipped.skipped_files

    def _read(self, index: int) -> Tuple[Image.Image, int]:
        """(image, file index actually read): ``index`` or the next readable file after it."""
        return self.skipped.read(index, load_rgb)

    def _apply(self, image: Image.Image, index: int) -> Any:
        if self.transform is None:
            return image
        if getattr(self.transform, "needs_index", False):
            return self.transform(image, index)  # per-sample seeded augmentation
        return self.transform(image)


@DATASETS.register("images")
class ImageFolder(_SkippingImageFiles):
    """Unlabelled images below ``root`` (recursive). ``ds[i]`` = ``transform(pil_rgb)``, or
    ``transform(pil_rgb, i)`` when ``transform.needs_index`` is true; the PIL image without transform."""

    dataset_name = "images"

    def __init__(self, root: Optional[Union[str, Path]] = None, *, transform: Optional[Callable] = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        self.root = resolve_data_root(self.dataset_name, root)
        files = list_images(self.root, extensions)
        require_images(self.root, files, extensions)
        super().__init__(files, transform)

    def __getitem__(self, index: int) -> Any:
        image, _ = self._read(index)
        return self._apply(image, index)


@DATASETS.register("coco")
class CocoImages(ImageFolder):
    """COCO images for pretraining (labels unused): ``root/<split>/`` if it exists, else ``root``."""

    dataset_name = "coco"

    def __init__(self, root: Optional[Union[str, Path]] = None, *, split: str = "train2017",
                 transform: Optional[Callable] = None) -> None:
        base = resolve_data_root("coco", root)
        super().__init__(base / split if (base / split).is_dir() else base, transform=transform)


@DATASETS.register("classification")
class ClassificationFolder(_SkippingImageFiles):
    """``root/<split>/<class_name>/*.jpg``. ``ds[i]`` = ``(transform(pil_rgb), label)``;
    ``classes`` are the sorted class folder names, ``targets`` the label of every file."""

    def __init__(self, root: Optional[Union[str, Path]] = None, *, split: str = "train",
                 transform: Optional[Callable] = None) -> None:
        self.root = resolve_data_root("classification", root)
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"split folder {folder} does not exist")
        self.classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"{folder}: no class folders (expected {folder}/<class>/<image>.jpg)")
        files, targets, empty = [], [], []
        for label, name in enumerate(self.classes):
            class_files = list_images(folder / name)
            files += class_files
            targets += [label] * len(class_files)
            if not class_files:
                empty.append(name)
        require_images(folder, files)
        if empty:
            logger.warning("%s: %d of %d class folders hold no image: %s", folder, len(empty), len(self.classes),
                           _listing(empty))
        self.targets = targets
        super().__init__(files, transform)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image, j = self._read(index)
        return self._apply(image, index), self.targets[j]
