"""Pretraining loader: deterministic sharded order per (seed, epoch), resumable mid-epoch, with the
views generated either by torchvision/PIL in the workers (CPU path) or batched on the device (GPU path).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from selfsup.data.images import IMAGE_EXTENSIONS, SkippedFiles
from selfsup.data.images import list_images as list_image_paths

from .config import AugmentConfig
from .cpu import MultiViewTransform
from .decode import crop_region, decode_reduced, is_jpeg, open_lazy
from .gpu import GpuMultiViewAugment, decode_on_device, pad_batch
from .params import collate_params, sample_view_params

log = logging.getLogger(__name__)

def list_images(root: Union[str, os.PathLike]) -> List[str]:
    """All image files under ``root`` (recursive), sorted, so the index of a file is stable."""
    return [str(p) for p in list_image_paths(Path(root), IMAGE_EXTENSIONS)]


def epoch_order(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """``rank``'s shard of the shuffled order of ``n`` items in ``epoch``: a function of (seed, epoch) only,
    padded to a multiple of ``world_size`` like DistributedSampler."""
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    total = math.ceil(n / world_size) * world_size
    order = np.concatenate([order, order[: total - n]]) if total > n else order
    return order[rank:total:world_size]


class PretrainViews(Dataset):
    """Files -> per-sample views (``mode="cpu"``) or decoded regions / JPEG bytes plus view parameters
    (``mode="region"`` / ``"bytes"``) for the GPU path. Items are addressed by ``(epoch, index)``.

    A file that cannot be read is skipped: the next readable file takes its place, keeping the
    parameters of the requested index; skips are logged and counted across worker processes
    (``num_skipped``, :class:`selfsup.data.images.SkippedFiles`).
    """

    def __init__(self, files: Sequence[str], cfg: AugmentConfig, seed: int, mode: str) -> None:
        if not files:
            raise ValueError("no image files")
        self.files, self.cfg, self.seed, self.mode = list(files), cfg, int(seed), mode
        self.transform = MultiViewTransform(cfg, seed)
        self.skipped = SkippedFiles(self.files)

    @property
    def num_skipped(self) -> int:
        return self.skipped.num_skipped

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        return self.skipped.read(index, lambda path: self._load(path, epoch, index))[0]

    def _load(self, path: str, epoch: int, index: int):
        if self.mode == "cpu":
            with open_lazy(path) as img:
                return self.transform(img, index, epoch=epoch)
        data = Path(path).read_bytes() if self.mode == "bytes" else None
        with open_lazy(data if data is not None else path) as img:
            width, height = img.size
            params = sample_view_params(self.cfg, self.seed, epoch, index, height, width)
            boxes = [p.box for p in params]
            if data is not None and is_jpeg(data):  # decoded on the device, at full size
                xyxy = torch.tensor([(l, t, l + w, t + h) for t, l, h, w in boxes], dtype=torch.float32)
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), xyxy, params
            sizes = [self.cfg.view_size(v) for v in range(len(params))]
            rgb, xyxy = decode_reduced(img, boxes, sizes)
            region, rel = crop_region(rgb, xyxy)
        return region, rel, params


def _collate_region(batch):
    images, boxes, params = zip(*batch)
    return pad_batch(images), torch.stack(boxes), collate_params(params)


def _collate_bytes(batch):
    items, boxes, params = zip(*batch)
    return list(items), torch.stack(boxes), collate_params(params)


class _Plan:
    """The batch sampler: the current epoch's batches of ``(epoch, index)`` keys, from ``start_step``."""

    def __init__(self) -> None:
        self.batches: List[List[Tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PretrainLoader:
    """Iterates ``[query [B,3,L,L], key [B,3,L,L], small_1 [B,3,S,S], ..., small_N]`` float32
    normalised tensors on ``device``. Call ``set_epoch(epoch, start_step)`` before every epoch."""

    def __init__(self, files: Sequence[str], cfg: AugmentConfig, *, batch_size: int, num_workers: int, seed: int,
                 rank: int, world_size: int, device: torch.device, gpu_aug: bool, drop_last: bool) -> None:
        self.cfg, self.batch_size, self.seed = cfg, int(batch_size), int(seed)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.device, self.gpu_aug = torch.device(device), gpu_aug
        mode = "cpu"
        if gpu_aug:
            mode = "bytes" if cfg.decode == "gpu" else "region"
            if mode == "bytes" and self.device.type != "cuda":
                log.warning("decode='gpu' needs a CUDA device; decoding on the CPU workers instead")
                mode = "region"
        self.mode = mode
        self.dataset = PretrainViews(files, cfg, seed, mode)
        self.augment = GpuMultiViewAugment(cfg) if gpu_aug else None
        self._plan = _Plan()
        collate = {"cpu": None, "region": _collate_region, "bytes": _collate_bytes}[mode]
        self._loader = DataLoader(self.dataset, batch_sampler=self._plan, num_workers=num_workers,
                                  collate_fn=collate, pin_memory=self.device.type == "cuda",
                                  persistent_workers=num_workers > 0,
                                  prefetch_factor=4 if num_workers > 0 else None)
        self.epoch = 0
        self.set_epoch(0)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's shard of the shuffled order of ``epoch`` (padded like DistributedSampler)."""
        return epoch_order(len(self.dataset), seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size)

    def __len__(self) -> int:
        shard = math.ceil(len(self.dataset) / self.world_size)
        return shard // self.batch_size if self.drop_last else math.ceil(shard / self.batch_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's order; the first ``start_step`` batches are skipped without being read."""
        self.epoch = int(epoch)
        self.dataset.transform.set_epoch(epoch)
        idx = self.epoch_indices(epoch)
        b = self.batch_size
        batches = [[(self.epoch, int(i)) for i in idx[s * b:(s + 1) * b]] for s in range(len(self))]
        self._plan.batches = batches[start_step:]

    def __iter__(self) -> Iterator[List[torch.Tensor]]:
        if self.mode == "cpu":
            for views in self._loader:
                yield [v.to(self.device, non_blocking=True) for v in views]
            return
        yield from self._gpu_iter()

    def _to_device(self, batch):
        images, boxes, params = batch
        if self.mode == "bytes":
            images = pad_batch(decode_on_device(images, self.device))
        else:
            images = images.to(self.device, non_blocking=True)
        return images, boxes, params

    def _gpu_iter(self) -> Iterator[List[torch.Tensor]]:
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None

        def stage(batch):  # host-to-device copy (and nvjpeg decode) of the next batch on the side stream
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                return self._to_device(batch)

        it = iter(self._loader)
        nxt = next((stage(b) for b in it), None)
        while nxt is not None:
            images, boxes, params = nxt
            if cuda:
                torch.cuda.current_stream(self.device).wait_stream(side)
                images.record_stream(torch.cuda.current_stream(self.device))
            nxt = next((stage(b) for b in it), None)
            yield self.augment(images, boxes, params)


def build_pretrain_loader(files: Union[str, os.PathLike, Sequence[str]], aug_cfg: AugmentConfig, *, batch_size: int,
                          num_workers: int, seed: int, rank: int = 0, world_size: int = 1,
                          device: Union[str, torch.device] = "cpu", gpu_aug: bool = False,
                          drop_last: bool = True) -> PretrainLoader:
    """Loader of pretraining views from an image folder (or a list of files).

    Per-sample randomness depends only on ``(seed, epoch, index)``, on both paths; ``gpu_aug`` moves
    all pixel augmentation to ``device`` (``aug_cfg.decode`` chooses where JPEGs are decoded).
    """
    if isinstance(files, (str, os.PathLike)):
        files = list_images(files)
    return PretrainLoader(files, aug_cfg, batch_size=batch_size, num_workers=num_workers, seed=seed, rank=rank,
                          world_size=world_size, device=device, gpu_aug=gpu_aug, drop_last=drop_last)
