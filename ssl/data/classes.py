"""Label sets shared by the embedded data generator (which writes them) and the readers (which read them).

The generator renders PASCAL VOC's 20 object classes and writes their names into the VOC, classification
and PASCAL-Context formats, so the list lives here, below both: ``selfsup.data.scenes`` and
``selfsup.data.synthetic`` render and write it, ``frozen.voc`` (VOC readers) and ``frozen.retrieval`` read it.
"""
from __future__ import annotations

from typing import Tuple

# PASCAL VOC class order: semseg ids 0..20 (0 = background).
CLASS_NAMES: Tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
PERSON = 15
