"""Input pipeline of a pretraining run: the image files of ``data.name`` and the view loader over them."""
from __future__ import annotations

import logging
from typing import List

import torch

from selfsup.augment.loader import PretrainLoader, build_pretrain_loader
from selfsup.config import ConfigError
from selfsup.data import EMBEDDED, build_dataset, ensure_embedded_data
from selfsup.data.catalog import EMBEDDED_SUBDIR
from selfsup.distributed import DistEnv, barrier
from selfsup.moco.config import PretrainConfig

logger = logging.getLogger(__name__)


def embedded_root(cfg: PretrainConfig, subdir: str) -> str:
    """``subdir`` of the embedded data at ``data.embedded_num`` images; only that format is generated."""
    return str(ensure_embedded_data(num=cfg.data.embedded_num, formats=(subdir,)) / subdir)


def pretrain_files(cfg: PretrainConfig) -> List[str]:
    """Image files of the pretraining set: a registered name (``coco``, ``embedded``, ...) or a folder.

    ``data.root: embedded`` takes that dataset's part of the embedded data at ``data.embedded_num`` images
    (``classification`` pretrains on its train split, labels unused)."""
    name, root = cfg.data.name, cfg.data.root
    if name == EMBEDDED:
        name, root = "coco", root or embedded_root(cfg, "coco")
    elif root == EMBEDDED and name in EMBEDDED_SUBDIR:  # e.g. the object-centric images: classification + embedded
        root = embedded_root(cfg, EMBEDDED_SUBDIR[name])
    dataset = build_dataset(name, root=root) if root is not None else build_dataset(name)
    return [str(f) for f in dataset.files]


def build_loader(cfg: PretrainConfig, env: DistEnv, device: torch.device) -> PretrainLoader:
    if not env.is_main:
        barrier()  # rank 0 first: it generates the embedded data if needed, the others then read it
    files = pretrain_files(cfg)
    if env.is_main:
        barrier()
    gpu_aug = device.type == "cuda" if cfg.data.gpu_aug is None else cfg.data.gpu_aug
    per_rank = cfg.optim.batch_size // env.world_size
    if len(files) < cfg.optim.batch_size:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is larger than the {len(files)} images in "
                          f"data.name={cfg.data.name!r}: one epoch would have no full batch")
    logger.info("pretraining on %d images from %s (%s augmentation, %d per process)", len(files), cfg.data.name,
                "GPU" if gpu_aug else "CPU", per_rank)
    return build_pretrain_loader(files, cfg.augment, batch_size=per_rank, num_workers=cfg.data.num_workers,
                                 seed=cfg.train.seed, rank=env.rank, world_size=env.world_size, device=device,
                                 gpu_aug=gpu_aug)
