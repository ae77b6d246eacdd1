"""Label-map helpers shared by the writers, readers and previews: palettes, boundaries, PNG I/O."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

IGNORE_INDEX = 255


def voc_palette(num: int = 256) -> np.ndarray:
    """The standard PASCAL VOC / DAVIS colour map: [num, 3] uint8 (bit-interleaved label index)."""
    palette = np.zeros((num, 3), np.uint8)
    for label in range(num):
        c, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[label] = (r, g, b)
    return palette


def label_boundaries(label: np.ndarray) -> np.ndarray:
    """One-pixel-thin boundary of a label map: a pixel is marked where its label differs from the
    pixel to its right or below (so each boundary is drawn once, on one side). [H,W] bool."""
    edge = np.zeros(label.shape, bool)
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    edge[:-1, :] |= label[:-1, :] != label[1:, :]
    return edge


def seg2bmap(label: np.ndarray) -> np.ndarray:
    """Boundary map of a label map as the BSDS / SEISM ``seg2bmap`` draws it (at the map's own size): a pixel
    is a boundary where its right, bottom or bottom-right neighbour has another label. [H,W] bool."""
    label = np.asarray(label)
    edge = np.zeros(label.shape, bool)
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    edge[:-1, :] |= label[:-1, :] != label[1:, :]
    edge[:-1, :-1] |= label[:-1, :-1] != label[1:, 1:]
    return edge


def thin(mask: np.ndarray) -> np.ndarray:
    """Thin boolean masks [..., H, W] to one-pixel-wide curves with MATLAB ``bwmorph(mask, 'thin', Inf)``
    semantics (``skimage.morphology.thin``: the two-subiteration algorithm of Lam, Lee & Suen that MATLAB uses)."""
    from skimage.morphology import thin as _thin

    mask = np.asarray(mask, bool)
    flat = mask.reshape(-1, *mask.shape[-2:])
    return np.stack([_thin(m) if m.any() else m.copy() for m in flat]).reshape(mask.shape)


def label_edges(label: np.ndarray) -> np.ndarray:
    """Edge ground truth of the multi-task benchmarks: ``bwmorph(seg2bmap(label), 'thin')``. [H,W] bool."""
    return thin(seg2bmap(label))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a (2r+1)^2 square, by shifted ORs."""
    out = mask.copy()
    H, W = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            ys, yd = slice(max(0, -dy), H - max(0, dy)), slice(max(0, dy), H - max(0, -dy))
            xs, xd = slice(max(0, -dx), W - max(0, dx)), slice(max(0, dx), W - max(0, -dx))
            out[yd, xd] |= mask[ys, xs]
    return out


def save_palette_png(path: Union[str, Path], index: np.ndarray) -> None:
    """Write an index map as a palette ('P' mode) PNG with the VOC palette."""
    image = Image.fromarray(index.astype(np.uint8))  # "L"; putpalette turns it into "P"
    image.putpalette(voc_palette().ravel().tolist())
    image.save(path)


def read_index_png(path: Union[str, Path]) -> np.ndarray:
    """Read a label PNG as its index array (palette PNGs give indices, not colours). [H,W] uint8."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: expected a palette or grey label PNG, got mode {image.mode}")
        return np.array(image)


def colourise(index: np.ndarray) -> np.ndarray:
    """Index map -> RGB uint8 with the VOC palette (255 = ignore is drawn white-ish as in VOC)."""
    return voc_palette()[np.clip(index, 0, 255).astype(np.int64)]
