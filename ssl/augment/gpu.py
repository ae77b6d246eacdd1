"""Batched view generation on the device (CUDA, or CPU tensors for tests).

Workers only decode (or read JPEG bytes) and sample the per-sample parameters; every pixel operation
runs here, batched over the whole batch with per-sample parameters. Float32 throughout.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from . import kernels as K
from .config import AugmentConfig
from .policy import OP_NAMES

log = logging.getLogger(__name__)

_JITTER = (K.brightness, K.contrast, K.saturation, K.hue)
_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue factors that leave x unchanged


def pad_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """uint8 [3, h_i, w_i] -> [B, 3, H, W], padded by edge replication so that bilinear sampling at a
    box border never mixes in padding."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    out = images[0].new_empty(len(images), 3, h, w)
    for i, im in enumerate(images):
        ih, iw = im.shape[1:]
        out[i, :, :ih, :iw] = im
        out[i, :, ih:, :iw] = im[:, -1:, :]
        out[i, :, :, iw:] = out[i, :, :, iw - 1:iw]
    return out


def decode_on_device(items: Sequence[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """Items are JPEG bytes (1-D uint8) or already-decoded uint8 [3, h, w]; returns [3, h, w] on device.
    JPEGs are decoded in one batched nvjpeg call; any that it cannot decode fall back to the CPU."""
    out: List[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    encoded = [i for i, t in enumerate(items) if t.dim() == 1]
    for i, t in enumerate(items):
        if t.dim() == 3:
            out[i] = t.to(device, non_blocking=True)
    if encoded:
        try:
            decoded = decode_jpeg([items[i] for i in encoded], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as err:  # e.g. CMYK or progressive files nvjpeg rejects
            log.warning("batched device JPEG decode failed (%s); decoding on the CPU", err)
            decoded = [_decode_or_blank(items[i]).to(device) for i in encoded]
        for i, im in zip(encoded, decoded):
            out[i] = im
    return out


def _decode_or_blank(data: torch.Tensor) -> torch.Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:  # a corrupt body behind a valid header: a flat grey image stands in
        log.warning("undecodable JPEG (%s); using a grey image", err)
        return torch.full((3, 1, 1), 128, dtype=torch.uint8)


class GpuMultiViewAugment:
    """``(images uint8 [B,3,H,W], boxes [B,V,4] x1y1x2y2, params) -> [query, key, small_1..]``.

    ``params`` is the CPU dict from ``collate_params``; index sets are computed from it on the host
    so that no step waits on the device.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def __call__(self, images: torch.Tensor, boxes: torch.Tensor, params: Dict[str, torch.Tensor]
                 ) -> List[torch.Tensor]:
        b, v = boxes.shape[:2]
        device = images.device
        images = images.float()
        mean = torch.tensor(self.cfg.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.std, device=device).view(1, 3, 1, 1)
        views: List[torch.Tensor] = []
        groups = [list(range(min(2, v))), list(range(2, v))]
        for group in filter(None, groups):
            size = self.cfg.view_size(group[0])
            # rows are view-major: row = g * B + b
            rows = {k: t[:, group].transpose(0, 1).reshape(len(group) * b, *t.shape[2:]) for k, t in params.items()}
            box = boxes[:, group].transpose(0, 1).reshape(-1, 4).to(device, torch.float32, non_blocking=True)
            idx = torch.arange(b, device=device, dtype=torch.float32).repeat(len(group))
            x = roi_align(images, torch.cat([idx[:, None], box], 1), output_size=size,
                          spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            x = self.apply(x.div_(255).clamp_(0, 1), rows)
            x = (x - mean) / std
            views.extend(x.split(b))
        return views

    def apply(self, x: torch.Tensor, p: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Flip, then the standard colour pipeline or AutoAugment, on crops [N, 3, S, S] in [0, 1]."""
        dev = x.device
        flip = p["flip"].to(dev, non_blocking=True).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        # standard pipeline: jitter in the sampled order (identity factors where unused), grayscale, blur
        std_rows = torch.nonzero(~p["auto_augment"]).squeeze(1)
        if std_rows.numel():
            s = {k: t[std_rows] for k, t in p.items()}
            y = x[std_rows.to(dev)]
            ident = torch.tensor(_IDENTITY).expand_as(s["factors"])
            for k in range(4):
                for op in range(4):
                    sel = s["jitter"] & (s["order"][:, k] == op)
                    if op == 3:  # hue is the costly one: only on the rows that need it
                        rows = torch.nonzero(sel).squeeze(1)
                        if rows.numel():
                            r = rows.to(dev)
                            y[r] = K.hue(y[r], s["factors"][rows, 3].to(dev))
                    elif sel.any():
                        f = torch.where(sel, s["factors"][:, op], ident[:, op]).to(dev, non_blocking=True)
                        y = _JITTER[op](y, f)
            g = s["grayscale"].to(dev, non_blocking=True).view(-1, 1, 1, 1)
            y = torch.where(g, K.gray(y).expand_as(y), y)
            blur_rows = torch.nonzero(s["blur"]).squeeze(1)
            if blur_rows.numel():
                r = blur_rows.to(dev)
                y[r] = K.gaussian_blur(y[r], s["sigma"][blur_rows].to(dev), self.cfg.blur_sigma[1])
            x[std_rows.to(dev)] = y
        aa_rows = torch.nonzero(p["auto_augment"]).squeeze(1)
        if aa_rows.numel():
            op_id, op_mag = p["op_id"][aa_rows], p["op_mag"][aa_rows]
            u = (x[aa_rows.to(dev)] * 255).round_()
            for slot in range(op_id.shape[1]):
                for op in torch.unique(op_id[:, slot]).tolist():
                    if op == 0:
                        continue
                    rows = torch.nonzero(op_id[:, slot] == op).squeeze(1)
                    r = rows.to(dev)
                    u[r] = K.auto_augment_op(u[r], OP_NAMES[op], op_mag[rows, slot].to(dev))
            x[aa_rows.to(dev)] = u / 255
        return x
