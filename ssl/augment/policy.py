"""AutoAugment ImageNet policy (Cubuk et al. 2019) as data: 25 sub-policies of two ops each.

Each op is ``(name, probability, magnitude_bin)``; magnitudes use 10 bins as in the paper.
"""
from __future__ import annotations

import math

IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)

OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
            "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP_ID = {name: i for i, name in enumerate(OP_NAMES)}
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
NUM_BINS = 10


def _lin(lo: float, hi: float, b: int) -> float:
    return lo + (hi - lo) * b / (NUM_BINS - 1)


def magnitude(name: str, bin_: int | None, sign: float, height: int, width: int) -> float:
    """The op's magnitude for a bin: shear slope, translation in pixels, rotation in degrees, enhance
    offset (factor = 1 + m), posterize bits, solarize threshold on the 0..255 scale; 0 when unused."""
    if bin_ is None:
        return 0.0
    if name in ("ShearX", "ShearY"):
        m = _lin(0.0, 0.3, bin_)
    elif name == "TranslateX":
        m = _lin(0.0, 150.0 / 331.0 * width, bin_)
    elif name == "TranslateY":
        m = _lin(0.0, 150.0 / 331.0 * height, bin_)
    elif name == "Rotate":
        m = _lin(0.0, 30.0, bin_)
    elif name in ("Brightness", "Color", "Contrast", "Sharpness"):
        m = _lin(0.0, 0.9, bin_)
    elif name == "Posterize":
        return float(8 - int(round(bin_ / ((NUM_BINS - 1) / 4))))
    elif name == "Solarize":
        return _lin(255.0, 0.0, bin_)
    else:
        return 0.0
    return sign * m if name in SIGNED else m


def shear_degrees(slope: float) -> float:
    return math.degrees(math.atan(slope))
