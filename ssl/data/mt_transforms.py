"""Joint transforms for multi-task samples (dicts from ``multitask.py``) that keep labels aligned.

Spatial keys are every tensor entry ([H,W] or [C,H,W]); 'meta' passes through untouched. The image
is resampled bilinearly, every label with nearest neighbour (no mixed classes, invalid stays
invalid). Randomness comes from torch's generator (seeded per DataLoader worker) or ``generator``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Sample = Dict[str, object]

# value written where a crop pads beyond the image: ignore for class maps and binary maps
# (losses must skip 255 in 'sal' / 'edge'), invalid (0) for depth and normals
PAD_VALUES: Dict[str, float] = {"image": 0.0, "semseg": 255, "human_parts": 255, "sal": 255, "edge": 255,
                                "depth": 0.0, "normals": 0.0}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _spatial(sample: Sample):
    return [(k, v) for k, v in sample.items() if isinstance(v, torch.Tensor) and v.dim() >= 2]


def _resize(key: str, value: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    x = value[None, None] if value.dim() == 2 else value[None]
    if key == "image":
        out = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    else:
        out = F.interpolate(x.float(), size=size, mode="nearest").to(value.dtype)
    return out[0, 0] if value.dim() == 2 else out[0]


def _rand(generator: Optional[torch.Generator]) -> float:
    return float(torch.rand((), generator=generator))


class Compose:
    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample


class RandomHorizontalFlip:
    """Flip every map; the normals' x component changes sign."""

    def __init__(self, p: float = 0.5, generator: Optional[torch.Generator] = None) -> None:
        self.p, self.generator = p, generator

    def __call__(self, sample: Sample) -> Sample:
        if _rand(self.generator) >= self.p:
            return sample
        out = dict(sample)
        for key, value in _spatial(sample):
            out[key] = value.flip(-1)
        if "normals" in out:
            normals = out["normals"].clone()
            normals[0] = -normals[0]
            out["normals"] = normals
        return out


class RandomScale:
    """Rescale by a factor drawn from ``scales``; depth is divided by it (a closer camera)."""

    def __init__(self, scales: Sequence[float] = (1.0, 1.2, 1.5), generator: Optional[torch.Generator] = None) -> None:
        self.scales, self.generator = list(scales), generator

    def __call__(self, sample: Sample) -> Sample:
        scale = self.scales[int(torch.randint(len(self.scales), (), generator=self.generator))]
        if scale == 1:
            return sample
        out = dict(sample)
        H, W = sample["image"].shape[-2:]
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        for key, value in _spatial(sample):
            out[key] = _resize(key, value, size)
        if "depth" in out:
            out["depth"] = out["depth"] / scale
        return out


class RandomCrop:
    """Crop to ``size`` at a random position, padding first (PAD_VALUES) where the sample is smaller."""

    def __init__(self, size: Union[int, Tuple[int, int]], pad_values: Optional[Dict[str, float]] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.pad_values = {**PAD_VALUES, **(pad_values or {})}
        self.generator = generator

    def __call__(self, sample: Sample) -> Sample:
        th, tw = self.size
        H, W = sample["image"].shape[-2:]
        ph, pw = max(0, th - H), max(0, tw - W)
        top = int(torch.randint(max(H, th) - th + 1, (), generator=self.generator))
        left = int(torch.randint(max(W, tw) - tw + 1, (), generator=self.generator))
        out = dict(sample)
        for key, value in _spatial(sample):
            if ph or pw:  # pad bottom/right
                value = F.pad(value[None].float() if value.dim() == 2 else value.float(), (0, pw, 0, ph),
                              value=float(self.pad_values.get(key, 255))).to(sample[key].dtype)
                value = value[0] if sample[key].dim() == 2 else value
            out[key] = value[..., top:top + th, left:left + tw]
        return out


class Resize:
    """Resize every map to ``size`` (H, W); label values are not changed."""

    def __init__(self, size: Union[int, Tuple[int, int]]) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        for key, value in _spatial(sample):
            out[key] = _resize(key, value, self.size)
        return out


class Normalize:
    """``(image - mean) / std`` on the 0..1 image (ImageNet statistics by default)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        out["image"] = (sample["image"] - self.mean) / self.std
        return out


def train_transform(size: Union[int, Tuple[int, int]] = 512, scales: Sequence[float] = (1.0, 1.2, 1.5)) -> Compose:
    """Flip -> random scale -> random crop/pad to ``size`` -> normalise."""
    return Compose([RandomHorizontalFlip(), RandomScale(scales), RandomCrop(size), Normalize()])


def eval_transform() -> Compose:
    """Original size, normalised (evaluation is at the original resolution)."""
    return Compose([Normalize()])
