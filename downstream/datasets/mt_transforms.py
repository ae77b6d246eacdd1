"""Joint transforms for multi-task samples (dicts from ``multitask.py``) that keep labels aligned.

Spatial keys are every tensor entry ([H,W] or [C,H,W]); 'meta' passes through untouched. The image
is resampled bilinearly, every label with nearest neighbour (no mixed classes, invalid stays
invalid). Randomness comes from torch's generator (seeded per DataLoader worker) or ``generator``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import math

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


class RandomScaleRotate:
    """Scale by ``s ~ U(scale_range)`` and rotate by ``θ ~ U(-max_angle, max_angle)`` degrees (counter-clockwise)
    about the image centre, keeping the image size (the published PASCAL-Context ``ScaleNRotate``).

    The image is sampled bilinearly, labels by nearest neighbour; pixels from outside the image get PAD_VALUES
    (ignore / invalid). Normal vectors turn with the image (their x/y components rotate by θ); depth is divided by s.
    """

    def __init__(self, scale_range: Sequence[float] = (0.75, 1.25), max_angle: float = 20.0,
                 generator: Optional[torch.Generator] = None) -> None:
        self.scale_range, self.max_angle, self.generator = tuple(scale_range), float(max_angle), generator

    def __call__(self, sample: Sample) -> Sample:
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * _rand(self.generator)
        angle = self.max_angle * (2 * _rand(self.generator) - 1)
        return rotate_scale(sample, angle, scale)


def rotate_scale(sample: Sample, angle: float, scale: float) -> Sample:
    """``sample`` rotated by ``angle`` degrees counter-clockwise and scaled by ``scale`` about its centre."""
    if angle == 0 and scale == 1:
        return sample
    H, W = sample["image"].shape[-2:]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    ys = torch.arange(H, dtype=torch.float64) + 0.5 - H / 2  # pixel centres, y down
    xs = torch.arange(W, dtype=torch.float64) + 0.5 - W / 2
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    # output -> input: inverse of p_out = scale * R p_in with R the on-screen counter-clockwise rotation (y down)
    x_in, y_in = (c * x - s * y) / scale, (s * x + c * y) / scale
    grid = torch.stack([x_in / (W / 2), y_in / (H / 2)], -1)[None].float()  # [1,H,W,2], align_corners=False
    inside = (x_in.abs() < W / 2) & (y_in.abs() < H / 2)
    out = dict(sample)
    for key, value in _spatial(sample):
        x_map = value[None, None] if value.dim() == 2 else value[None]
        mode = "bilinear" if key == "image" else "nearest"
        warped = F.grid_sample(x_map.float(), grid, mode=mode, padding_mode="border", align_corners=False)
        warped = torch.where(inside, warped, torch.tensor(float(PAD_VALUES.get(key, 255)))).to(value.dtype)
        out[key] = warped[0, 0] if value.dim() == 2 else warped[0]
    if "normals" in out:  # (x right, y up) components turn counter-clockwise with the content
        n = out["normals"].clone()
        n[0], n[1] = c * out["normals"][0] - s * out["normals"][1], s * out["normals"][0] + c * out["normals"][1]
        out["normals"] = n
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


AUGMENTATIONS = ("scale_crop", "scale_rotate_resize")


def train_transform(size: Union[int, Tuple[int, int]] = 512, scales: Sequence[float] = (1.0, 1.2, 1.5), *,
                    augment: str = "scale_crop", scale_range: Sequence[float] = (0.75, 1.25),
                    max_angle: float = 20.0) -> Compose:
    """``scale_crop``: flip -> random scale from ``scales`` -> random crop/pad to ``size`` -> normalise (NYUD);
    ``scale_rotate_resize``: flip -> scale ~ U(scale_range) and rotation ~ U(±max_angle) -> fixed resize to
    ``size`` -> normalise (the published PASCAL-Context training transforms)."""
    if augment == "scale_crop":
        return Compose([RandomHorizontalFlip(), RandomScale(scales), RandomCrop(size), Normalize()])
    if augment == "scale_rotate_resize":
        return Compose([RandomHorizontalFlip(), RandomScaleRotate(scale_range, max_angle), Resize(size), Normalize()])
    raise ValueError(f"data.augment={augment!r}: expected one of {', '.join(AUGMENTATIONS)}")


def eval_transform() -> Compose:
    """Original size, normalised (evaluation is at the original resolution)."""
    return Compose([Normalize()])
