"""Qualitative figures of the frozen-feature protocols: label overlays in captioned rows of tiles."""
from __future__ import annotations

import numpy as np

from selfsup.data.labels import colourise
from selfsup.data.preview import save_tile_rows

__all__ = ["overlay", "save_tile_rows"]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """RGB uint8 [H,W,3] with the VOC-palette colours of ``labels`` [H,W] blended over non-zero labels."""
    colour = colourise(labels).astype(np.float32)
    keep = (labels == 0)[..., None]
    blended = np.where(keep, image.astype(np.float32), (1 - alpha) * image + alpha * colour)
    return blended.clip(0, 255).astype(np.uint8)
