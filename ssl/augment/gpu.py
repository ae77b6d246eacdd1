"""Batched view generation on the device (CUDA, or CPU tensors for tests).

Workers only decode (or read JPEG bytes) and sample the per-sample parameters; every pixel operation
runs here, batched over the whole batch with per-sample parameters. Float32 throughout.

No step waits on the device: every index set and per-sample parameter is built on the host (the params
dict is on the CPU) and copied through pinned memory with ``non_blocking``; constants (mean, std) are made
once per device.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from selfsup.device import constant, upload

from . import kernels as K
from .config import AugmentConfig
from .policy import OP_NAMES

log = logging.getLogger(__name__)

_JITTER = (K.brightness, K.contrast, K.saturation, K.hue)
_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue factors that leave x unchanged


def pad_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """uint8 [3, h_i, w_i] -> [B, 3, H, W], padded by edge replication so that bilinear sampling at a
    box border never mixes in padding.

    Images of one size are padded together (a few copies per distinct size, not per image: COCO has
    a handful of sizes per batch)."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    by_size: Dict[tuple, List[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(tuple(im.shape[1:]), []).append(i)
    out = None if len(by_size) == 1 else images[0].new_empty(len(images), 3, h, w)
    for (ih, iw), idx in by_size.items():
        same = torch.stack([images[i] for i in idx])  # [n, 3, ih, iw]
        block = same if (ih, iw) == (h, w) else same.new_empty(len(idx), 3, h, w)
        if block is not same:
            block[:, :, :ih, :iw] = same
            block[:, :, ih:, :iw] = same[:, :, -1:, :]
            block[:, :, :, iw:] = block[:, :, :, iw - 1:iw]
        if out is None:
            return block
        out.index_copy_(0, upload(torch.tensor(idx), out.device), block)
    return out


def decode_on_device(items: Sequence[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """Items are JPEG bytes (1-D uint8) or already-decoded uint8 [3, h, w]; returns [3, h, w] on device.
    JPEGs are decoded in one batched nvjpeg call; any that it cannot decode fall back to the CPU."""
    out: List[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    encoded = [i for i, t in enumerate(items) if t.dim() == 1]
    for i, t in enumerate(items):
        if t.dim() == 3:
            out[i] = upload(t, device)
    if encoded:
        try:
            decoded = decode_jpeg([items[i] for i in encoded], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as err:  # e.g. CMYK or progressive files nvjpeg rejects
            log.warning("batched device JPEG decode failed (%s); decoding on the CPU", err)
            decoded = [upload(_decode_or_blank(items[i]), device) for i in encoded]
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

    def __init__(self, cfg: AugmentConfig, *, chunk: int = 32) -> None:
        self.cfg = cfg
        self.chunk = int(chunk)  # images converted to float at a time (never the whole uint8 batch)

    def __call__(self, images: torch.Tensor, boxes: torch.Tensor, params: Dict[str, torch.Tensor]
                 ) -> List[torch.Tensor]:
        b, v = boxes.shape[:2]
        device = images.device
        mean = constant(self.cfg.mean, device).view(1, 3, 1, 1)
        std = constant(self.cfg.std, device).view(1, 3, 1, 1)
        groups = [g for g in (list(range(min(2, v))), list(range(2, v))) if g]
        crops = self._crops(images, boxes.cpu(), groups)
        views: List[torch.Tensor] = []
        for group, x in zip(groups, crops):
            # rows are view-major: row = g * B + b
            rows = {k: t[:, group].transpose(0, 1).reshape(len(group) * b, *t.shape[2:]) for k, t in params.items()}
            x = self.apply(x.div_(255).clamp_(0, 1), rows)
            views.extend(x.sub_(mean).div_(std).split(b))
        return views

    def _crops(self, images: torch.Tensor, boxes: torch.Tensor, groups: List[List[int]]) -> List[torch.Tensor]:
        """roi_align of each view group's boxes [len(group) * B, 3, S, S] (view-major rows), converting at
        most ``chunk`` images of the uint8 batch to float at a time."""
        b = boxes.shape[0]
        sizes = [self.cfg.view_size(group[0]) for group in groups]
        crops = [torch.empty(len(g), b, 3, s, s, device=images.device) for g, s in zip(groups, sizes)]
        for start in range(0, b, self.chunk):
            stop = min(b, start + self.chunk)
            x = images[start:stop].float()
            for group, size, out in zip(groups, sizes, crops):
                box = boxes[start:stop, group].transpose(0, 1).reshape(-1, 4).float()
                idx = torch.arange(stop - start, dtype=torch.float32).repeat(len(group))
                rois = upload(torch.cat([idx[:, None], box], 1), images.device)  # [len(group) * n, 5], built here
                out[:, start:stop] = roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                                               aligned=True).view(len(group), stop - start, 3, size, size)
        return [c.view(-1, 3, s, s) for c, s in zip(crops, sizes)]

    def apply(self, x: torch.Tensor, p: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Flip, then the standard colour pipeline or AutoAugment, on crops [N, 3, S, S] in [0, 1].

        ``p`` holds host tensors: index sets are computed here and uploaded (pinned, non-blocking)."""
        dev = x.device

        def up(t: torch.Tensor) -> torch.Tensor:
            return upload(t, dev)

        flip = up(p["flip"]).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        # standard pipeline: jitter in the sampled order (identity factors where unused), grayscale, blur
        std_rows = torch.nonzero(~p["auto_augment"]).squeeze(1)
        if std_rows.numel():
            s = {k: t[std_rows] for k, t in p.items()}
            std_dev = up(std_rows)
            y = x[std_dev]
            ident = torch.tensor(_IDENTITY).expand_as(s["factors"])
            for k in range(4):
                for op in range(4):
                    sel = s["jitter"] & (s["order"][:, k] == op)
                    if op == 3:  # hue is the costly one: only on the rows that need it
                        rows = torch.nonzero(sel).squeeze(1)
                        if rows.numel():
                            r = up(rows)
                            y[r] = K.hue(y[r], up(s["factors"][rows, 3]))
                    elif sel.any():
                        f = up(torch.where(sel, s["factors"][:, op], ident[:, op]))
                        y = _JITTER[op](y, f)
            g = up(s["grayscale"]).view(-1, 1, 1, 1)
            y = torch.where(g, K.gray(y).expand_as(y), y)
            blur_rows = torch.nonzero(s["blur"]).squeeze(1)
            if blur_rows.numel():
                r = up(blur_rows)
                y[r] = K.gaussian_blur(y[r], up(s["sigma"][blur_rows]), self.cfg.blur_sigma[1])
            x[std_dev] = y
        aa_rows = torch.nonzero(p["auto_augment"]).squeeze(1)
        if aa_rows.numel():
            op_id, op_mag = p["op_id"][aa_rows], p["op_mag"][aa_rows]
            aa_dev = up(aa_rows)
            u = (x[aa_dev] * 255).round_()
            for slot in range(op_id.shape[1]):
                for op in torch.unique(op_id[:, slot]).tolist():
                    if op == 0:
                        continue
                    rows = torch.nonzero(op_id[:, slot] == op).squeeze(1)
                    r = up(rows)
                    u[r] = K.auto_augment_op(u[r], OP_NAMES[op], up(op_mag[rows, slot]))
            x[aa_dev] = u / 255
        return x
