"""Image decoding for the pretraining loaders: reduced-size JPEG decode and the view bounding region."""
from __future__ import annotations

import io
import math
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from selfsup.data.images import to_rgb

FloatBox = Tuple[float, float, float, float]  # x1, y1, x2, y2 (pixel edges)


def open_lazy(path_or_bytes) -> Image.Image:
    """Open without decoding: the size is known from the header, ``draft`` is still possible."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        return Image.open(io.BytesIO(path_or_bytes))
    return Image.open(path_or_bytes)


def decode_reduced(img: Image.Image, boxes: Sequence[Tuple[int, int, int, int]], sizes: Sequence[int]
                   ) -> Tuple[Image.Image, List[FloatBox]]:
    """Decode ``img`` as RGB, at a reduced size when every view still keeps at least its output
    resolution (JPEG DCT scaling via ``draft``), and return the boxes as x1, y1, x2, y2 in the
    decoded image's pixels."""
    width, height = img.size
    shrink = min(min(h, w) / s for (_, _, h, w), s in zip(boxes, sizes))
    if shrink >= 2 and img.format == "JPEG":  # no effect on an image that is already loaded
        img.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
    img = to_rgb(img)  # 16-bit PNGs scaled to 8 bits, not clipped
    sx, sy = img.size[0] / width, img.size[1] / height
    return img, [(l * sx, t * sy, (l + w) * sx, (t + h) * sy) for t, l, h, w in boxes]


def crop_region(img: Image.Image, boxes: Sequence[FloatBox]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The bounding region of all views as uint8 [3, h, w] and the boxes relative to it: [V, 4]."""
    x1 = max(0, int(math.floor(min(b[0] for b in boxes))))
    y1 = max(0, int(math.floor(min(b[1] for b in boxes))))
    x2 = min(img.size[0], int(math.ceil(max(b[2] for b in boxes))))
    y2 = min(img.size[1], int(math.ceil(max(b[3] for b in boxes))))
    region = torch.from_numpy(np.asarray(img.crop((x1, y1, x2, y2)), dtype=np.uint8).copy()).permute(2, 0, 1)
    rel = torch.tensor(boxes, dtype=torch.float32) - torch.tensor([x1, y1, x1, y1], dtype=torch.float32)
    return region.contiguous(), rel


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"
