"""Online monitors of a pretraining run: frozen-feature evaluations every ``train.knn_every_epochs`` epochs.

``train.monitors`` names them (default ``[knn]``):

* ``knn``:       kNN top-1 on ``data.knn_monitor`` (the embedded classification set)  -> ``monitor/knn_acc``
* ``davis``:     DAVIS label propagation J&F on 2 embedded val sequences (12 frames)  -> ``monitor/davis_jf``
* ``retrieval``: VOC segment retrieval mIoU (21 classes), 24 embedded train / 24 val images
                 (centroids fitted on every 4th pixel)                                -> ``monitor/retrieval_miou``

Each also logs its cost, ``monitor/seconds_<name>``. The dense monitors evaluate a stride-8 copy of the
backbone (the evaluation code lives in ``downstream.evaluation``, imported when such a monitor is asked for).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from selfsup.registry import Registry

logger = logging.getLogger(__name__)

MONITORS = Registry("monitor")
Monitor = Callable[[nn.Module], Dict[str, float]]
DAVIS_SEQUENCES, DAVIS_FRAMES, RETRIEVAL_IMAGES = 2, 12, 24


@MONITORS.register("knn")
def knn_monitor(cfg, device: torch.device) -> Optional[Monitor]:
    from selfsup.moco.data import build_knn_monitor

    accuracy = build_knn_monitor(cfg, device)
    return None if accuracy is None else (lambda backbone: {"knn_acc": accuracy(backbone)})


@MONITORS.register("davis")
def davis_monitor(cfg, device: torch.device) -> Monitor:
    from selfsup.data import DAVIS2017
    from downstream.evaluation.features import dense_from_backbone
    from downstream.evaluation.propagation import propagation_jf

    dataset = DAVIS2017("embedded", split="val")
    indices = range(min(DAVIS_SEQUENCES, len(dataset)))

    def monitor(backbone: nn.Module) -> Dict[str, float]:
        extractor = dense_from_backbone(backbone, arch=cfg.model.backbone)
        return {"davis_jf": propagation_jf(extractor, dataset, indices=indices, max_frames=DAVIS_FRAMES)["J&F-Mean"]}

    return monitor


@MONITORS.register("retrieval")
def retrieval_monitor(cfg, device: torch.device) -> Monitor:
    from selfsup.data import VOC2012Segmentation
    from downstream.evaluation.features import dense_from_backbone
    from downstream.evaluation.retrieval import run_retrieval

    train_set, val_set = (VOC2012Segmentation("embedded", split=s) for s in ("train", "val"))

    def monitor(backbone: nn.Module) -> Dict[str, float]:
        extractor = dense_from_backbone(backbone, arch=cfg.model.backbone)
        result = run_retrieval(extractor, train_set, val_set, max_images=RETRIEVAL_IMAGES, fit_stride=4,
                               progress=False)
        return {"retrieval_miou": result["miou_21"]}

    return monitor


def build_monitors(cfg, device: torch.device) -> Optional[Monitor]:
    """One callable running every monitor of ``cfg.train.monitors``: ``backbone -> {scalar: value}``
    (with ``seconds_<name>``); None when none is on."""
    built = [(name, MONITORS.build(name, cfg=cfg, device=device)) for name in cfg.train.monitors]
    built = [(name, m) for name, m in built if m is not None]
    if not built:
        return None

    def run(backbone: nn.Module) -> Dict[str, float]:
        was_training = backbone.training
        scalars: Dict[str, float] = {}
        for name, monitor in built:
            start = time.perf_counter()
            scalars.update(monitor(backbone))
            scalars[f"seconds_{name}"] = time.perf_counter() - start
        backbone.train(was_training)
        return scalars

    return run


def log_monitors(monitor: Monitor, backbone: nn.Module, *, epoch: int, step: int, writer,
                 history: List[Dict[str, float]]) -> None:
    """Run ``monitor``, append ``{"epoch", **scalars}`` to ``history``, write ``monitor/*`` scalars, log."""
    scalars = monitor(backbone)
    history.append({"epoch": epoch, **scalars})
    writer.scalars(scalars, step, prefix="monitor/")
    logger.info("monitors after epoch %d: %s", epoch,
                ", ".join(f"{k} {v:.2f}" for k, v in scalars.items() if not k.startswith("seconds_")))
