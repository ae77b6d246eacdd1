"""RandomResizedCrop box sampling and constrained multi-crop, driven by an explicit numpy Generator.

Boxes are ``(top, left, height, width)`` in pixels of the original image, as torchvision's
``RandomResizedCrop.get_params`` returns them.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

Box = Tuple[int, int, int, int]  # top, left, height, width


def _draw_size(rng: np.random.Generator, area: float, scale, ratio) -> Tuple[int, int]:
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    return h, w


def _center_fallback(height: int, width: int, ratio) -> Box:
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def sample_box(rng: np.random.Generator, height: int, width: int,
               scale: Tuple[float, float] = (0.08, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """Same semantics as ``torchvision.transforms.RandomResizedCrop.get_params`` (10 tries, then a
    centre crop clipped to the ratio range)."""
    area = height * width
    for _ in range(10):
        h, w = _draw_size(rng, area, scale, ratio)
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return _center_fallback(height, width, ratio)


def overlap_fraction(box: Box, ref: Box) -> float:
    """Area of ``box ∩ ref`` divided by the area of ``box``."""
    t, l, h, w = box
    rt, rl, rh, rw = ref
    ih = max(0, min(t + h, rt + rh) - max(t, rt))
    iw = max(0, min(l + w, rl + rw) - max(l, rl))
    return ih * iw / float(h * w)


def _sample_inside(rng: np.random.Generator, height: int, width: int, key: Box, scale, ratio) -> Box | None:
    """A box whose area is drawn relative to the whole image, placed uniformly inside ``key``."""
    kt, kl, kh, kw = key
    h, w = _draw_size(rng, height * width, scale, ratio)
    if 0 < w <= kw and 0 < h <= kh:
        return kt + int(rng.integers(0, kh - h + 1)), kl + int(rng.integers(0, kw - w + 1)), h, w
    return None


def sample_constrained_box(rng: np.random.Generator, height: int, width: int, key: Box, *,
                           scale: Tuple[float, float], ratio: Tuple[float, float], constraint: str = "overlap",
                           min_overlap: float = 0.1, tries: int = 10) -> Tuple[Box, bool]:
    """One small crop tied to the key box; returns ``(box, constraint_met)``.

    ``overlap`` (published code): up to ``tries`` boxes until one has ``|box ∩ key| >= min_overlap·|box|``.
    ``inside`` (thesis): up to ``tries`` boxes placed inside the key box. Both fall back to an
    unconstrained box when every try fails; ``none`` is always unconstrained.
    """
    if constraint == "overlap":
        for _ in range(tries):
            box = sample_box(rng, height, width, scale, ratio)
            if overlap_fraction(box, key) >= min_overlap:
                return box, True
    elif constraint == "inside":
        for _ in range(tries):
            box = _sample_inside(rng, height, width, key, scale, ratio)
            if box is not None:
                return box, True
    elif constraint != "none":
        raise ValueError(f"unknown constraint {constraint!r}; known: overlap, inside, none")
    return sample_box(rng, height, width, scale, ratio), constraint == "none"


def sample_multicrop_boxes(rng: np.random.Generator, height: int, width: int, cfg) -> Tuple[List[Box], List[bool]]:
    """Boxes of all views of one image: [query, key, small_1..small_N], and per box whether its
    constraint was met (always True for the large crops). The large crops are drawn first."""
    boxes = [sample_box(rng, height, width, cfg.large_scale, cfg.ratio) for _ in range(2)]
    met = [True, True]
    for _ in range(cfg.num_small):
        box, ok = sample_constrained_box(rng, height, width, boxes[1], scale=cfg.small_scale, ratio=cfg.ratio,
                                         constraint=cfg.constraint, min_overlap=cfg.min_overlap,
                                         tries=cfg.constraint_tries)
        boxes.append(box)
        met.append(ok)
    return boxes, met
