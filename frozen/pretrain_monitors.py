"""The online monitors of a pretraining run, built from the frozen-feature evaluations of this layer and
registered into ``selfsup.monitors.MONITORS`` when this module is imported:

* ``knn``:       kNN top-1 on ``data.knn_monitor`` (the embedded classification set)  -> ``monitor/knn_acc``
* ``davis``:     DAVIS label propagation J&F on 2 embedded val sequences (12 frames)  -> ``monitor/davis_jf``
* ``retrieval``: VOC segment retrieval mIoU (21 classes), 24 embedded train / 24 val images
                 (centroids fitted on every 4th pixel)                                -> ``monitor/retrieval_miou``

The dense monitors evaluate a stride-8 copy of the backbone. The entry points launch :func:`pretrain`, which
lives here so that a process that unpickles it (a SLURM job, a spawned local worker) imports this module and
so registers the monitors before ``run_pretraining`` looks them up.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from selfsup.data import EMBEDDED
from selfsup.moco.config import PretrainConfig
from selfsup.moco.loop import run_pretraining
from selfsup.moco.pipeline import embedded_root
from selfsup.monitors import MONITORS, Monitor

from .knn import extract_features, knn_accuracy, labelled_loaders

DAVIS_SEQUENCES, DAVIS_FRAMES, RETRIEVAL_IMAGES = 2, 12, 24


def build_knn_monitor(cfg: PretrainConfig, device: torch.device) -> Optional[Callable[[nn.Module], float]]:
    """``monitor(backbone) -> kNN top-1 (%)`` on the labelled classification set, or None when off."""
    if cfg.data.knn_monitor == "none":
        return None
    name, root = cfg.data.knn_monitor, cfg.data.knn_monitor_root
    if name == EMBEDDED:
        name, root = "classification", root or embedded_root(cfg, "classification")
    loaders, num_classes = labelled_loaders(name, root, size=cfg.augment.large_size,
                                            workers=min(2, cfg.data.num_workers), mean=cfg.augment.mean,
                                            std=cfg.augment.std)

    def monitor(backbone: nn.Module) -> float:
        train, val = (extract_features(backbone, loader, device=device) for loader in loaders)
        return knn_accuracy(train, val, num_classes=num_classes, k=20, temperature=0.07)

    return monitor


@MONITORS.register("knn")
def knn_monitor(cfg: PretrainConfig, device: torch.device) -> Optional[Monitor]:
    accuracy = build_knn_monitor(cfg, device)
    return None if accuracy is None else (lambda backbone: {"knn_acc": accuracy(backbone)})


@MONITORS.register("davis")
def davis_monitor(cfg: PretrainConfig, device: torch.device) -> Monitor:
    from .davis import DAVIS2017
    from .features import dense_from_backbone
    from .propagation import propagation_jf

    dataset = DAVIS2017("embedded", split="val")
    indices = range(min(DAVIS_SEQUENCES, len(dataset)))

    def monitor(backbone: nn.Module) -> Dict[str, float]:
        extractor = dense_from_backbone(backbone, arch=cfg.model.backbone)
        return {"davis_jf": propagation_jf(extractor, dataset, indices=indices, max_frames=DAVIS_FRAMES)["J&F-Mean"]}

    return monitor


@MONITORS.register("retrieval")
def retrieval_monitor(cfg: PretrainConfig, device: torch.device) -> Monitor:
    from .features import dense_from_backbone
    from .retrieval import run_retrieval
    from .voc import VOC2012Segmentation

    train_set, val_set = (VOC2012Segmentation("embedded", split=s) for s in ("train", "val"))

    def monitor(backbone: nn.Module) -> Dict[str, float]:
        extractor = dense_from_backbone(backbone, arch=cfg.model.backbone)
        result = run_retrieval(extractor, train_set, val_set, max_images=RETRIEVAL_IMAGES, fit_stride=4,
                               progress=False)
        return {"retrieval_miou": result["miou_21"]}

    return monitor


def pretrain(cfg: PretrainConfig) -> Dict[str, Any]:
    """:func:`selfsup.moco.loop.run_pretraining` with this module's monitors registered: the callable
    ``launch/pretrain.py`` runs locally and submits to SLURM."""
    return run_pretraining(cfg)
