"""The monitor interface of a pretraining run: evaluations of the frozen backbone every
``train.knn_every_epochs`` epochs, named by ``train.monitors`` (default ``[knn]``).

A *monitor factory* ``factory(cfg, device) -> Monitor | None`` is registered under a name in ``MONITORS``; a
*monitor* maps the backbone to scalars, ``backbone -> {name: value}``. This package defines no monitor itself:
the evaluations live in the ``frozen`` layer above it, and the entry points register them by importing
``frozen.pretrain_monitors`` (``knn``, ``davis``, ``retrieval``; see docs/evaluation.md). A SLURM job gets them
because the callable it runs, ``frozen.pretrain_monitors.pretrain``, lives in that module.

``build_monitors`` runs the named ones in order and adds each one's cost, ``seconds_<name>``; ``log_monitors``
writes them as ``monitor/*`` scalars.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from selfsup.config import ConfigError
from selfsup.registry import Registry

logger = logging.getLogger(__name__)

Monitor = Callable[[nn.Module], Dict[str, float]]
MonitorFactory = Callable[..., Optional[Monitor]]  # factory(cfg=..., device=...) -> Monitor | None (None: off)
MONITORS = Registry("monitor")


def build_monitors(cfg: Any, device: torch.device, registry: Registry = MONITORS) -> Optional[Monitor]:
    """One callable running every monitor of ``cfg.train.monitors``: ``backbone -> {scalar: value}``
    (with ``seconds_<name>``); None when none is on."""
    unknown = [name for name in cfg.train.monitors if name not in registry]
    if unknown:
        known = ", ".join(registry.names()) or "none registered"
        raise ConfigError(f"train.monitors: unknown monitor {unknown[0]!r}; known: {known} (the entry points "
                          f"register knn, davis and retrieval by importing frozen.pretrain_monitors)")
    built = [(name, registry.build(name, cfg=cfg, device=device)) for name in cfg.train.monitors]
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
