"""Batched augmentation kernels with one parameter per sample.

Colour ops take float images in [0, 1], shape [N, 3, H, W], and factors of shape [N]. AutoAugment
ops take float images holding integer values 0..255 (uint8 semantics, as PIL applies them).
Only the hue shift is kornia's; everything else is a small torch kernel written here.
Constants are made on the device once (``selfsup.device.constant``, cached kernels): no kernel copies a
host value to the device per call.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_hue as _kornia_adjust_hue

from selfsup.device import constant

_GRAY = (0.299, 0.587, 0.114)


def _col(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, [N, 1, H, W]."""
    return _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]


def blend(x: torch.Tensor, other, ratio: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    r = _col(ratio)
    return (r * x + (1 - r) * other).clamp_(0, bound)


def brightness(x, f, bound=1.0):
    return blend(x, 0.0, f, bound)


def contrast(x, f, bound=1.0):
    return blend(x, gray(x).mean(dim=(1, 2, 3), keepdim=True), f, bound)


def saturation(x, f, bound=1.0):
    return blend(x, gray(x), f, bound)


def hue(x, shift):
    """Hue rotation by ``shift`` turns (torchvision's hue_factor in [-0.5, 0.5])."""
    return _kornia_adjust_hue(x, shift * 2 * math.pi).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, a different sigma per sample, as one grouped convolution per axis."""
    n, c, h, w = x.shape
    radius = int(math.ceil(3 * max_sigma))
    radius = min(radius, h - 1, w - 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma.to(x.dtype)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*C, 2r+1]
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.view(n, c, h, w)


# ---- AutoAugment ops on 0..255-valued float images -------------------------------------------

def posterize(u, bits):
    step = torch.pow(2.0, 8 - bits).to(u.dtype)
    return torch.floor(u / _col(step)) * _col(step)


def solarize(u, threshold):
    return torch.where(u >= _col(threshold), 255 - u, u)


def invert(u, _=None):
    return 255 - u


def autocontrast(u, _=None):
    lo = u.amin(dim=(2, 3), keepdim=True)
    hi = u.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, torch.ones_like(hi), 255 / (hi - lo).clamp_min(1))
    return torch.where(flat, u, ((u - lo) * scale).floor_().clamp_(0, 255))


def equalize(u, _=None):
    """Per-channel histogram equalisation with PIL's lookup-table rule."""
    n, c, h, w = u.shape
    v = u.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, device=u.device, dtype=torch.long).scatter_add_(1, v, torch.ones_like(v))
    last = torch.where(hist > 0, torch.arange(256, device=u.device), -1).amax(1, keepdim=True)
    step = (hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255  # [N*C, 1]
    cum = torch.cumsum(hist, 1) - hist  # pixels strictly below each level
    lut = ((cum + step // 2) // step.clamp_min(1)).clamp_(0, 255)
    out = torch.where(step > 0, lut.gather(1, v), v)
    return out.view(n, c, h, w).to(u.dtype)


def color(u, m):
    return saturation(u, 1 + m, 255.0).round_()


def contrast_aa(u, m):
    return contrast(u, 1 + m, 255.0).round_()


def brightness_aa(u, m):
    return brightness(u, 1 + m, 255.0).round_()


@lru_cache(maxsize=32)
def _smooth_kernel(channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """PIL's SMOOTH filter [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, one per channel: [C, 1, 3, 3]."""
    k = torch.ones(3, 3, dtype=dtype)
    k[1, 1] = 5
    return (k / 13).expand(channels, 1, 3, 3).contiguous().to(device)


def sharpness(u, m):
    n, c, h, w = u.shape
    k = _smooth_kernel(c, u.device, u.dtype)
    smooth = u.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(u, k, groups=c).round_()  # borders keep the original pixels
    return blend(u, smooth, 1 + m, 255.0).round_()


def affine_nearest(u: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Warp with per-sample 2x3 matrices mapping output pixel centres to input pixel centres
    (pixel coordinates), nearest interpolation, fill 0."""
    n, _, h, w = u.shape
    d = constant((w / 2, h / 2), u.device, u.dtype)
    a, b = matrix[:, :, :2], matrix[:, :, 2]
    theta = torch.empty(n, 2, 3, device=u.device, dtype=u.dtype)
    theta[:, :, :2] = a * d[None, None, :] / d[None, :, None]  # D^-1 A D
    theta[:, :, 2] = ((a @ d) + b - d) / d
    grid = F.affine_grid(theta, list(u.shape), align_corners=False)
    return F.grid_sample(u, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def affine_matrix(op: str, mag: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse (output -> input) pixel maps of the AutoAugment geometric ops."""
    n = mag.shape[0]
    m = torch.zeros(n, 2, 3, device=mag.device, dtype=torch.float32)
    m[:, 0, 0] = 1
    m[:, 1, 1] = 1
    if op == "ShearX":  # about the origin, as torchvision's AutoAugment
        m[:, 0, 1] = mag
    elif op == "ShearY":
        m[:, 1, 0] = mag
    elif op == "TranslateX":
        m[:, 0, 2] = -mag.trunc()
    elif op == "TranslateY":
        m[:, 1, 2] = -mag.trunc()
    elif op == "Rotate":  # about the centre
        rad = torch.deg2rad(mag)
        cos, sin = torch.cos(rad), torch.sin(rad)
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
        cx, cy = w / 2, h / 2
        m[:, 0, 2] = cx - cos * cx + sin * cy
        m[:, 1, 2] = cy - sin * cx - cos * cy
    else:
        raise ValueError(op)
    return m


GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
PIXEL_OPS = {
    "Identity": lambda u, m: u, "Brightness": brightness_aa, "Color": color, "Contrast": contrast_aa,
    "Sharpness": sharpness, "Posterize": posterize, "Solarize": solarize, "AutoContrast": autocontrast,
    "Equalize": equalize, "Invert": invert,
}


def auto_augment_op(u: torch.Tensor, op: str, mag: torch.Tensor) -> torch.Tensor:
    if op in GEOMETRIC:
        return affine_nearest(u, affine_matrix(op, mag, u.shape[2], u.shape[3]).to(u.dtype))
    return PIXEL_OPS[op](u, mag)
