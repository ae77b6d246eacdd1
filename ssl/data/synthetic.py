"""Embedded data: write procedural scenes (``scenes.py``) in the on-disk formats of the real datasets.

Every image is seeded by ``(seed, format, index)``, so the output does not depend on the number of
worker processes. ``ensure_embedded_data()`` gives the default dataset root used by tests, smoke
runs and examples, generating it once (into a temporary folder, then renamed).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.io
from PIL import Image

from .labels import dilate, label_boundaries, save_palette_png
from .classes import CLASS_NAMES, PERSON
from .scenes import BACKGROUND_LABELS, sample_scene, render_scene

logger = logging.getLogger(__name__)

FORMATS: Tuple[str, ...] = ("coco", "pascal_context", "nyud", "davis2017", "voc2012", "classification")
_FORMAT_CODE = {name: code for code, name in enumerate(FORMATS)}
# bump a format's version when what it writes changes: a cached set is named after the newest version among its
# formats (data_version), so sets without the changed format keep their cache
# (7: v6's PASCAL LabelMap / person-part changes + VOC07-style multi-label lists
#  voc2012/ImageSets/Main/<class>_{trainval,test}.txt)
# (8, coco only: scenes of 2-4 dominant objects side by side, COCO_MAIN_OBJECTS)
FORMAT_VERSIONS: Dict[str, int] = {**{fmt: 7 for fmt in FORMATS}, "coco": 8, "nyud": 9}
GENERATOR_VERSION = max(FORMAT_VERSIONS.values())
DEFAULT_SIZE = 96
DEFAULT_NUM = 200
DEFAULT_SEED = 0
VIDEO_FRAMES = 24
DAVIS_IMAGES_PER_VIDEO = 25  # davis2017 gets num // 25 videos (at least 6) for ``num`` images per dense format
# Parts of PASCAL-Part person annotations written for each of our 6 part labels.
_PART_FILE_NAMES = {1: "head", 2: "torso", 3: "luarm", 4: "llarm", 5: "luleg", 6: "llleg"}
# PASCAL-Context LabelMap ids (459-class labelling) of our classes and of the wall / floor background.
# Some are among the 170 ids on which the distilled normals are valid (bicycle, bottle, car, cat, chair, dog,
# person, plant, sofa, table, tvmonitor, wall, floor), the others are not (aeroplane, bird, boat, bus, cow,
# horse, motorbike, sheep, train), so the normals-validity rule is exercised on the written files.
CONTEXT_LABEL_IDS = {1: 2, 2: 23, 3: 25, 4: 31, 5: 34, 6: 45, 7: 59, 8: 65, 9: 72, 10: 98, 11: 397, 12: 113,
                     13: 207, 14: 258, 15: 284, 16: 293, 17: 344, 18: 368, 19: 416, 20: 427,
                     BACKGROUND_LABELS["wall"]: 440, BACKGROUND_LABELS["floor"]: 158}
# probability that a person of a PASCAL-Context image is written without part annotations (as in PASCAL-Part)
PERSON_WITHOUT_PARTS_PROB = 0.3
# NYUD PNG value for our labels: 0 = unlabelled, 1 wall, 2 floor, object class c -> c + 2 (<= 22).
NYUD_WALL, NYUD_FLOOR = 1, 2
# NYUD rooms: the back wall 3-6 m away (the default scene's wall stands at its 9 m cap in 3 of 4 images, a mean
# depth of 5.8 m against NYUD-v2's indoor 2-4 m), so depth RMSE is not decided by one far wall per image
NYUD_WALL_DEPTH_M = (3.0, 6.0)


def _rng(seed: int, fmt: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _FORMAT_CODE[fmt], index])


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, quality=90)


def _aspect_width(rng: np.random.Generator, size: int) -> int:
    return int(round(size * rng.choice([0.75, 1.0, 4 / 3])))


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals [H,W,3] (zero = invalid) -> uint8 RGB as in PASCAL ``normals_distill``
    (decoded ``2x/255 - 1``); valid pixels never encode to all-zero."""
    code = np.clip(np.round((normals + 1) * 127.5), 0, 255).astype(np.uint8)
    valid = np.any(normals != 0, axis=-1)
    code[valid & ~code.any(-1)] = 1
    code[~valid] = 0
    return code


def _parts_struct(scene, labels: Dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A PASCAL-Part style ``anno`` struct: anno.objects(j).{class, class_ind, mask, parts(k).{part_name, mask}}.

    A person has no part annotations with probability ``PERSON_WITHOUT_PARTS_PROB`` (empty ``parts``)."""
    visible = [k for k in np.unique(labels["object_id"]) if k > 0]
    objects = np.zeros((1, len(visible)), dtype=[("class", object), ("class_ind", object), ("mask", object), ("parts", object)])
    for j, k in enumerate(visible):
        obj = scene.objects[k - 1]
        mask = labels["object_id"] == k
        parts = np.zeros((0, 0), dtype=[("part_name", object), ("mask", object)])
        if obj.cls == PERSON and rng.random() >= PERSON_WITHOUT_PARTS_PROB:
            present = [p for p in _PART_FILE_NAMES if np.any(mask & (labels["parts"] == p))]
            parts = np.zeros((1, len(present)), dtype=parts.dtype)
            for i, p in enumerate(present):
                parts[0, i] = (_PART_FILE_NAMES[p], (mask & (labels["parts"] == p)).astype(np.uint8))
        objects[0, j] = (CLASS_NAMES[obj.cls], np.array([[obj.cls]], np.uint8), mask.astype(np.uint8), parts)
    anno = np.zeros((1, 1), dtype=[("imname", object), ("objects", object)])
    anno[0, 0] = ("", objects)
    return anno


# --------------------------------------------------------------------------------------------
# One writer per format: (out folder, index, size, seed, num) -> None. Runs in worker processes.
# --------------------------------------------------------------------------------------------
# objects per COCO-format (pretraining) scene: several of the object classes, each at the size of a classification
# image's object, side by side (the scene-centric premise of the improved recipe: crops of one scene often show
# different objects, and same-class objects recur across scenes for the kNN positives to find)
COCO_MAIN_OBJECTS = (2, 4)


def coco_scene(seed: int, i: int, size: int):
    """The scene of COCO-format image ``i``: 2-4 dominant objects side by side (``COCO_MAIN_OBJECTS``)."""
    rng = _rng(seed, "coco", i)
    width = _aspect_width(rng, size)
    main = int(rng.integers(COCO_MAIN_OBJECTS[0], COCO_MAIN_OBJECTS[1] + 1))
    return sample_scene(rng, size, width, main_objects=main)


def _write_coco(out: Path, i: int, size: int, seed: int, num: int) -> None:
    labels = render_scene(coco_scene(seed, i, size))
    _save_jpeg(out / "train2017" / f"{i:012d}.jpg", labels["image"])


def pascal_id(i: int) -> str:
    return f"2008_{i:06d}"


def _write_pascal_context(out: Path, i: int, size: int, seed: int, num: int) -> None:
    rng = _rng(seed, "pascal_context", i)
    scene = sample_scene(rng, size, _aspect_width(rng, size))
    labels = render_scene(scene)
    name = pascal_id(i)
    _save_jpeg(out / "JPEGImages" / f"{name}.jpg", labels["image"])
    Image.fromarray(labels["semseg"]).save(out / "semseg" / "pascal-context" / f"{name}.png")
    Image.fromarray(encode_normals(labels["normals"])).save(out / "normals_distill" / f"{name}.png")
    Image.fromarray(labels["saliency"] * 255).save(out / "sal_distill" / f"{name}.png")
    parts_rng = np.random.default_rng([seed, _FORMAT_CODE["pascal_context"], i, 1])
    scipy.io.savemat(out / "human_parts" / f"{name}.mat", {"anno": _parts_struct(scene, labels, parts_rng)},
                     do_compression=True)
    label_map = np.vectorize(CONTEXT_LABEL_IDS.get, otypes=[np.uint16])(labels["context"])
    scipy.io.savemat(out / "pascal-context" / "trainval" / f"{name}.mat", {"LabelMap": label_map}, do_compression=True)


def nyud_id(i: int) -> str:
    return f"{i + 1:06d}"


def _write_nyud(out: Path, i: int, size: int, seed: int, num: int) -> None:
    rng = _rng(seed, "nyud", i)
    labels = render_scene(sample_scene(rng, size, int(round(size * 4 / 3)), person_prob=0.2,
                                       wall_depth_m=NYUD_WALL_DEPTH_M))
    name = nyud_id(i)
    seg = np.where(labels["semseg"] > 0, labels["semseg"] + 2, np.where(labels["context"] == BACKGROUND_LABELS["wall"], NYUD_WALL, NYUD_FLOOR))
    seg = seg.astype(np.uint8)
    # Kinect-like holes: missing depth (0) and normals (zero vectors) in a few blobs
    H, W = seg.shape
    rows, cols = np.mgrid[0:H, 0:W]
    hole = np.zeros((H, W), bool)
    for _ in range(int(rng.integers(0, 3))):
        cy, cx, ry, rx = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(2, H / 8), rng.uniform(2, W / 8)
        hole |= ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1
    depth = np.where(hole, 0.0, labels["depth"]).astype(np.float32)
    normals = np.where(hole[..., None], 0.0, labels["normals"]).astype(np.float32)
    _save_jpeg(out / "images" / f"{name}.jpg", labels["image"])
    Image.fromarray(seg).save(out / "segmentation" / f"{name}.png")
    np.save(out / "depth" / f"{name}.npy", depth)
    np.save(out / "normals" / f"{name}.npy", normals.astype(np.float16))  # readers cast to float32
    np.save(out / "edge" / f"{name}.npy", label_boundaries(seg).astype(np.uint8))


def _davis_scene(seed: int, i: int, size: int):
    """(sequence name, scene) of video ``i``; 1-3 annotated moving objects."""
    moving = int(_rng(seed, "davis2017", 10**6 + i).integers(1, 4))
    scene = sample_scene(_rng(seed, "davis2017", i), size, int(round(size * 16 / 9)), moving=moving)
    return f"{CLASS_NAMES[scene.objects[0].cls]}-{i:03d}", scene


def _write_davis2017(out: Path, i: int, size: int, seed: int, num: int) -> None:
    name, scene = _davis_scene(seed, i, size)
    frames = out / "JPEGImages" / "480p" / name
    annotations = out / "Annotations" / "480p" / name
    frames.mkdir(parents=True, exist_ok=True)
    annotations.mkdir(parents=True, exist_ok=True)
    for t in range(VIDEO_FRAMES):
        labels = render_scene(scene, t=float(t))
        _save_jpeg(frames / f"{t:05d}.jpg", labels["image"])
        save_palette_png(annotations / f"{t:05d}.png", labels["instance"])


def voc_id(i: int) -> str:
    return f"2007_{i:06d}"


def _write_voc2012(out: Path, i: int, size: int, seed: int, num: int) -> None:
    rng = _rng(seed, "voc2012", i)
    labels = render_scene(sample_scene(rng, size, _aspect_width(rng, size)))
    # VOC marks object outlines as void (255); the band is ~5 px at 500 px, at least 1 px here
    band = dilate(label_boundaries(labels["object_id"]), max(1, size // 192))
    mask = np.where(band, 255, labels["semseg"]).astype(np.uint8)
    _save_jpeg(out / "JPEGImages" / f"{voc_id(i)}.jpg", labels["image"])
    save_palette_png(out / "SegmentationClass" / f"{voc_id(i)}.png", mask)


def _classification_counts(num: int) -> Tuple[int, int]:
    """Images per class in train / val."""
    return max(2, num // 20), max(1, num // 40)


def _write_classification(out: Path, i: int, size: int, seed: int, num: int) -> None:
    per_train, per_val = _classification_counts(num)
    per_class = per_train + per_val
    cls = 1 + i // per_class
    n = i % per_class
    split, n = ("train", n) if n < per_train else ("val", n - per_train)
    rng = _rng(seed, "classification", i)
    labels = render_scene(sample_scene(rng, size, size, main_class=cls))
    _save_jpeg(out / split / CLASS_NAMES[cls] / f"{n:05d}.jpg", labels["image"])


_WRITERS: Dict[str, Callable[[Path, int, int, int, int], None]] = {
    "coco": _write_coco, "pascal_context": _write_pascal_context, "nyud": _write_nyud,
    "davis2017": _write_davis2017, "voc2012": _write_voc2012, "classification": _write_classification,
}


def _num_items(fmt: str, num: int) -> int:
    if fmt == "davis2017":
        return max(6, num // DAVIS_IMAGES_PER_VIDEO)  # sequences of VIDEO_FRAMES frames
    if fmt == "classification":
        return (len(CLASS_NAMES) - 1) * sum(_classification_counts(num))
    return num


def train_count(fmt: str, n: int) -> int:
    """Images of the train split when ``fmt`` is written with ``n`` images (the first ones: image i is the same
    for any ``n``); the rest are val (none for coco and classification)."""
    if fmt == "davis2017":
        return max(1, (2 * n) // 3)
    if fmt == "nyud":
        return max(1, (55 * n) // 100)  # 795 / 654 in the real set
    return max(1, n // 2)


def _prepare(out: Path, fmt: str) -> None:
    folders = {
        "coco": ["train2017"],
        "pascal_context": ["JPEGImages", "ImageSets/Context", "semseg/pascal-context", "human_parts",
                           "normals_distill", "sal_distill", "pascal-context/trainval"],
        "nyud": ["images", "segmentation", "depth", "normals", "edge", "gt_sets"],
        "davis2017": ["JPEGImages/480p", "Annotations/480p", "ImageSets/2017"],
        "voc2012": ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "ImageSets/Main"],
        "classification": [f"{split}/{name}" for split in ("train", "val") for name in CLASS_NAMES[1:]],
    }[fmt]
    for folder in folders:
        (out / fmt / folder).mkdir(parents=True, exist_ok=True)


def _write_splits(out: Path, fmt: str, n: int, seed: int) -> None:
    names = {
        "pascal_context": (pascal_id, "ImageSets/Context"), "nyud": (nyud_id, "gt_sets"),
        "voc2012": (voc_id, "ImageSets/Segmentation"),
        "davis2017": (lambda i: _davis_scene(seed, i, 8)[0], "ImageSets/2017"),
    }
    if fmt not in names:
        return
    to_name, folder = names[fmt]
    ids = [to_name(i) for i in range(n)]
    n_train = train_count(fmt, n)
    for split, part in (("train", ids[:n_train]), ("val", ids[n_train:])):
        (out / fmt / folder / f"{split}.txt").write_text("".join(f"{x}\n" for x in part))
    if fmt == "voc2012":
        _write_voc07_lists(out / fmt, ids[:n_train], ids[n_train:])


# a class whose visible (non-void) area is below this fraction of the image is marked difficult (0)
VOC07_DIFFICULT_AREA = 0.005


def voc07_image_labels(mask: np.ndarray) -> np.ndarray:
    """VOC07 classification labels of one segmentation mask: [20] int, 1 present, 0 difficult, -1 absent."""
    counts = np.bincount(mask[mask != 255].ravel(), minlength=len(CLASS_NAMES))[1:len(CLASS_NAMES)]
    return np.where(counts >= VOC07_DIFFICULT_AREA * mask.size, 1, np.where(counts > 0, 0, -1))


def _write_voc07_lists(root: Path, trainval: Sequence[str], test: Sequence[str]) -> None:
    """``ImageSets/Main/<class>_{trainval,test}.txt`` ("<id> <label>" lines) from the segmentation masks."""
    from .labels import read_index_png

    for split, ids in (("trainval", trainval), ("test", test)):
        labels = np.stack([voc07_image_labels(read_index_png(root / "SegmentationClass" / f"{i}.png")) for i in ids])
        for c, name in enumerate(CLASS_NAMES[1:]):
            lines = "".join(f"{i} {label:2d}\n" for i, label in zip(ids, labels[:, c]))
            (root / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text(lines)


def _run_job(job: Tuple[str, Path, int, int, int, int]) -> None:
    fmt, out, index, size, seed, num = job
    _WRITERS[fmt](out / fmt, index, size, seed, num)


def generate_datasets(
    out: Union[str, Path], *, size: int = DEFAULT_SIZE, num: int = DEFAULT_NUM, seed: int = DEFAULT_SEED,
    formats: Sequence[str] = FORMATS, workers: int = 1, progress: bool = False,
) -> Path:
    """Write the synthetic datasets under ``out/<format>/`` and return ``out``.

    ``num`` images per dense format (coco, pascal_context, nyud, voc2012); ``num // 25`` videos of
    24 frames for davis2017 (at least 6); ``num // 20`` train + ``num // 40`` val images per class
    for classification. Image height is ``size``.
    """
    out = Path(out)
    unknown = [f for f in formats if f not in _WRITERS]
    if unknown:
        raise KeyError(f"unknown formats {unknown}; known: {', '.join(FORMATS)}")
    jobs: List[Tuple[str, Path, int, int, int, int]] = []
    for fmt in formats:
        _prepare(out, fmt)
        jobs += [(fmt, out, i, size, seed, num) for i in range(_num_items(fmt, num))]
    start = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="synthetic data", unit="item")
    if workers > 1:
        with get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_run_job, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))):
                if bar is not None:
                    bar.update()
    else:
        for job in jobs:
            _run_job(job)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    for fmt in formats:
        _write_splits(out, fmt, _num_items(fmt, num), seed)
    info = {"size": size, "num": num, "seed": seed, "formats": list(formats), "seconds": round(time.time() - start, 2)}
    (out / "embedded.json").write_text(json.dumps(info, indent=1))
    logger.info("wrote %d items of %s to %s in %.1fs", len(jobs), ",".join(formats), out, info["seconds"])
    return out


def data_version(formats: Sequence[str]) -> int:
    """The generator version of a set of formats: the newest among them (the ``v<N>`` of its cache folder)."""
    return max(FORMAT_VERSIONS[f] for f in formats)


def default_cache_dir() -> Path:
    """``$SCENESSL_DATA`` if set, else ``~/.cache/scenessl``."""
    return Path(os.environ.get("SCENESSL_DATA") or Path.home() / ".cache" / "scenessl")


def ensure_embedded_data(
    root: Optional[Union[str, Path]] = None, *, size: int = DEFAULT_SIZE, num: int = DEFAULT_NUM,
    seed: int = DEFAULT_SEED, workers: Optional[int] = None, formats: Sequence[str] = FORMATS,
) -> Path:
    """Return the embedded dataset root, generating it on first use.

    The root is ``root`` if given, else ``<cache>/<kind>-v<version>-<size>-<num>-<seed>`` (``data_version``) with ``<cache>``
    from :func:`default_cache_dir`; ``<kind>`` is ``embedded`` for every format (``coco/ pascal_context/ nyud/
    davis2017/ voc2012/ classification/``), ``objects`` for ``formats=("classification",)`` alone (what the
    object-centric pretraining needs: a sixth of the generation time), else the formats joined by ``+``.
    Generation writes into a temporary sibling folder that is renamed when complete, so concurrent callers
    and interrupted runs never see a partial dataset.
    """
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"embedded formats {list(formats)}: expected some of {', '.join(FORMATS)}")
    kind = "embedded" if set(formats) == set(FORMATS) else "objects" if formats == ("classification",) \
        else "+".join(formats)
    target = Path(root) if root is not None else \
        default_cache_dir() / f"{kind}-v{data_version(formats)}-{size}-{num}-{seed}"
    if (target / "embedded.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        generate_datasets(tmp, size=size, num=num, seed=seed, formats=formats,
                          workers=workers or min(4, os.cpu_count() or 1))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "embedded.json").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
