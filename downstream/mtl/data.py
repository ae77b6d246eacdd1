"""Datasets and loaders for multi-task finetuning (readers and transforms live in ``downstream.datasets``)."""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch import distributed as dist
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from selfsup.augment.loader import epoch_order
from selfsup.augment.params import sample_rng
from selfsup.data import build_dataset
from downstream.datasets.mt_transforms import PAD_VALUES, eval_transform, train_transform

from .config import DataConfig


def collate_padded(samples: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """Stack samples; maps of different sizes are padded bottom/right (PAD_VALUES), 'meta' becomes a list.

    Evaluation crops predictions back to each ``meta['size']``, so padding never reaches a metric.
    """
    batch: Dict[str, object] = {"meta": [s["meta"] for s in samples]}
    keys = [k for k, v in samples[0].items() if isinstance(v, torch.Tensor)]
    for key in keys:
        tensors = [s[key] for s in samples]
        H = max(t.shape[-2] for t in tensors)
        W = max(t.shape[-1] for t in tensors)
        padded = [t if t.shape[-2:] == (H, W) else
                  F.pad(t.float(), (0, W - t.shape[-1], 0, H - t.shape[-2]), value=float(PAD_VALUES.get(key, 0))).to(t.dtype)
                  for t in tensors]
        batch[key] = torch.stack(padded)
    return batch


def resolve_crop_size(cfg: DataConfig) -> Tuple[int, int]:
    """``cfg.crop_size``, or the size of the first training image when it is null."""
    if cfg.crop_size is not None:
        return tuple(cfg.crop_size)  # type: ignore[return-value]
    train = build_dataset(cfg.dataset, root=cfg.root, split=cfg.train_split, tasks=[], transform=None)
    return tuple(train[0]["image"].shape[-2:])  # type: ignore[index,return-value]


def mean_train_depth(cfg: DataConfig, max_images: int = 64) -> float:
    """Mean valid depth (metres, GT > 0) of up to ``max_images`` training images spread over the split."""
    train = build_dataset(cfg.dataset, root=cfg.root, split=cfg.train_split, tasks=["depth"], transform=None)
    n = len(train) if not cfg.max_train_images else min(cfg.max_train_images, len(train))
    total, count = 0.0, 0
    for index in np.linspace(0, n - 1, num=min(max_images, n)).round().astype(int):
        depth = torch.as_tensor(train[int(index)]["depth"])
        valid = depth > 0
        total, count = total + float(depth[valid].double().sum()), count + int(valid.sum())
    if count == 0:
        raise ValueError(f"no valid depth (> 0) in the {cfg.train_split!r} split of {cfg.root}")
    return total / count


def build_datasets(cfg: DataConfig) -> Tuple[Dataset, Dataset]:
    tasks = list(cfg.tasks) + list(cfg.auxiliary_tasks)
    train = build_dataset(cfg.dataset, root=cfg.root, split=cfg.train_split, tasks=tasks,
                          transform=train_transform(resolve_crop_size(cfg), cfg.scales, augment=cfg.augment,
                                                    scale_range=cfg.scale_range, max_angle=cfg.rotation))
    val = build_dataset(cfg.dataset, root=cfg.root, split=cfg.val_split, tasks=list(cfg.tasks), transform=eval_transform())
    if cfg.max_train_images:
        train = Subset(train, range(min(cfg.max_train_images, len(train))))
    if cfg.max_val_images:
        val = Subset(val, range(min(cfg.max_val_images, len(val))))
    return train, val


class EpochSampler(Sampler):
    """``(epoch, index)`` keys of one epoch in an order that is a function of (seed, epoch) only, sharded over
    ranks like DistributedSampler; nothing to save in a checkpoint, so a resumed run sees the same order.
    ``set_epoch(epoch, start=k)`` starts at the k-th key (a run resumed mid-epoch skips what it trained)."""

    def __init__(self, num_items: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_items, self.seed, self.rank, self.world_size = num_items, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order = epoch_order(self.num_items, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size)
        return iter([(self.epoch, int(i)) for i in order[self.start:]])

    def __len__(self) -> int:
        return max(0, math.ceil(self.num_items / self.world_size) - self.start)


class SeededSamples(Dataset):
    """``ds[(epoch, index)]``: sample ``index`` with torch's random draws (flip, scale, crop) seeded from
    (seed, epoch, index), in any worker process and after any resume (as the pretraining views are)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, object]:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            torch.manual_seed(int(sample_rng(self.seed, epoch, index).integers(2 ** 63)))
            return self.dataset[index]


def build_loaders(cfg: DataConfig, *, seed: int, distributed: bool) -> Tuple[DataLoader, DataLoader]:
    train, val = build_datasets(cfg)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    sampler = EpochSampler(len(train), seed=seed, rank=rank, world_size=world_size)
    drop_last = len(sampler) >= cfg.batch_size  # tiny subsets still give one batch
    # own generators: starting an iterator draws the workers' base seed, which must not come from (and advance)
    # the global RNG, or a resumed run's dropout draws would differ from an uninterrupted run's
    train_loader = DataLoader(SeededSamples(train, seed), batch_size=cfg.batch_size, sampler=sampler,
                              num_workers=cfg.num_workers, collate_fn=collate_padded, drop_last=drop_last,
                              pin_memory=torch.cuda.is_available(), persistent_workers=cfg.num_workers > 0,
                              generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers,
                            collate_fn=collate_padded, generator=torch.Generator().manual_seed(seed))
    return train_loader, val_loader


def dataset_ids(dataset: Dataset) -> List[str]:
    """Sample ids of a multi-task dataset or of a ``Subset`` of one, in order."""
    if isinstance(dataset, Subset):
        return [dataset_ids(dataset.dataset)[i] for i in dataset.indices]
    return list(dataset.ids)


def targets_of(batch: Dict[str, object], tasks: List[str], device: torch.device) -> Dict[str, torch.Tensor]:
    return {t: batch[t].to(device, non_blocking=True) for t in tasks}  # type: ignore[union-attr]
