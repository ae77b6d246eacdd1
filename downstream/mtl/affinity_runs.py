"""Measuring task affinities: single-task networks, branch-point features, transfer retraining.

``compute_task_affinity(cfg, method=...)`` trains (or loads) one single-task network per task with
:func:`downstream.mtl.train.run_finetune` and returns the [D, N, N] affinity of :mod:`downstream.mtl.affinity`.
Held-out images are the first K of the validation split (never trained on).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from itertools import cycle
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from selfsup.checkpoint import load_checkpoint
from selfsup.config import load_config
from selfsup.data import build_dataset
from downstream.datasets.mt_transforms import eval_transform

from .affinity import rdm, rsa_affinity, transfer_affinity
from .branched import backbone_pieces, check_branch_points, stage_outputs
from .config import MTLConfig
from .data import build_loaders, collate_padded
from .losses import task_loss
from .train import model_from_config, run_finetune

logger = logging.getLogger(__name__)

METHODS = ("rsa", "transfer")


def single_task_config(cfg: MTLConfig, task: str, run_dir: Path) -> MTLConfig:
    """``cfg`` as the single-task run of ``task`` (no auxiliary tasks, no Δ_MTL reference)."""
    return dataclasses.replace(cfg, output_dir=str(run_dir),
                               data=dataclasses.replace(cfg.data, tasks=[task], auxiliary_tasks=[]),
                               model=dataclasses.replace(cfg.model, arch="single_task", branching=[]),
                               eval=dataclasses.replace(cfg.eval, single_task_results=None))


def single_task_models(cfg: MTLConfig, runs_dir: Path, *, single_task_results: Optional[str] = None) -> Dict[str, nn.Module]:
    """One trained single-task model per task of ``cfg``: loaded from ``runs_dir/<task>`` when it has results.json
    (a finished run), else trained there first. ``single_task_results``: the JSON the runs add their metrics to."""
    models = {}
    for task in cfg.data.tasks:
        run_dir = runs_dir / task
        if not (run_dir / "results.json").is_file():
            st = single_task_config(cfg, task, run_dir)
            st = dataclasses.replace(st, eval=dataclasses.replace(st.eval, single_task_results=single_task_results))
            logger.info("training the single-task %s network in %s", task, run_dir)
            run_finetune(st)
        models[task] = load_run_model(run_dir)
    return models


def load_run_model(run_dir: Path) -> nn.Module:
    """The model of a finished finetuning run (its config.yaml + checkpoint.pth), in eval mode on the CPU."""
    for name in ("config.yaml", "checkpoint.pth"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} is missing: --single-task-runs must hold <task>/config.yaml "
                                    "and <task>/checkpoint.pth of finished single-task runs")
    model = model_from_config(load_config(MTLConfig, yaml_path=run_dir / "config.yaml"))
    model.load_state_dict(load_checkpoint(run_dir / "checkpoint.pth")["model"])
    return model.eval()


def held_out_samples(cfg: MTLConfig, num_images: int) -> List[Dict[str, object]]:
    """The first ``num_images`` validation images (fewer when the split is smaller), with the tasks' labels."""
    val = build_dataset(cfg.data.dataset, root=cfg.data.root, split=cfg.data.val_split, tasks=list(cfg.data.tasks),
                        transform=eval_transform())
    return [val[i] for i in range(min(num_images, len(val)))]


def _flat(output: object, max_side: int) -> torch.Tensor:
    maps = output if isinstance(output, (list, tuple)) else [output]
    pooled = [F.adaptive_avg_pool2d(m, (min(max_side, m.shape[-2]), min(max_side, m.shape[-1]))) for m in maps]
    return torch.cat([p.flatten(1) for p in pooled], dim=1)


@torch.no_grad()
def branch_point_features(model: nn.Module, samples: Sequence[Mapping[str, object]], branch_points: Sequence[int], *,
                          size: Tuple[int, int], max_side: int = 32) -> List[np.ndarray]:
    """Per branch point [K, F] features of the model's backbone (images resized to ``size``, maps pooled to at most
    ``max_side`` per side so a K x F matrix of a large model fits in memory)."""
    model.eval()
    feats: List[List[torch.Tensor]] = [[] for _ in branch_points]
    for sample in samples:
        image = F.interpolate(sample["image"][None].float(), size=size, mode="bilinear", align_corners=False)
        outs = stage_outputs(model.encoder.backbone, image, last=max(branch_points))
        for d, p in enumerate(branch_points):
            feats[d].append(_flat(outs[p - 1], max_side))
    return [torch.cat(f).numpy() for f in feats]


def rsa_affinity_tensor(models: Mapping[str, nn.Module], samples, branch_points: Sequence[int], *,
                        size: Tuple[int, int]) -> np.ndarray:
    features = {t: branch_point_features(m, samples, branch_points, size=size) for t, m in models.items()}
    return np.stack([rsa_affinity([rdm(features[t][d]) for t in models]) for d in range(len(branch_points))])


@torch.no_grad()
def per_sample_losses(model: nn.Module, task: str, samples: Sequence[Mapping[str, object]]) -> np.ndarray:
    model.eval()
    losses = []
    for sample in samples:
        batch = collate_padded([sample])
        pred = model(batch["image"])["final"][task]
        losses.append(float(task_loss(task, pred, batch[task])))
    return np.asarray(losses)


def transfer_model(target: nn.Module, source: nn.Module, point: int) -> Tuple[nn.Module, List[nn.Module]]:
    """A copy of ``target`` whose backbone pieces up to stage ``point`` are ``source``'s, frozen (returned too)."""
    model = copy.deepcopy(target)
    frozen = backbone_pieces(model.encoder.backbone)[:point + 1]
    for mine, theirs in zip(frozen, backbone_pieces(source.encoder.backbone)):
        mine.load_state_dict(theirs.state_dict())
        mine.requires_grad_(False)
    return model, frozen


def retrain(model: nn.Module, frozen: Sequence[nn.Module], task: str, loader, *, steps: int, lr: float) -> nn.Module:
    """``steps`` Adam steps on ``task`` for the trainable layers; the frozen pieces stay in eval mode (BN stats kept)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = cycle(loader)
    model.train()
    for piece in frozen:
        piece.eval()
    for _ in range(steps):
        batch = next(batches)
        loss = task_loss(task, model(batch["image"])["final"][task], batch[task])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def transfer_affinity_tensor(cfg: MTLConfig, models: Mapping[str, nn.Module], samples, branch_points: Sequence[int], *,
                             steps: int, progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """[D, N, N] affinity and the [D, N (task), N (encoder), K] per-sample losses behind it.

    For every depth d, task t and encoder task a: a's bottom (up to branch point d) frozen under t's remaining
    layers and head, retrained ``steps`` steps for t (a = t too, so every encoder gets the same treatment)."""
    tasks = list(models)
    loader, _ = build_loaders(cfg.data, seed=cfg.seed, distributed=False)
    losses = np.zeros((len(branch_points), len(tasks), len(tasks), len(samples)))
    bar = tqdm(total=losses.shape[0] * len(tasks) ** 2, desc="transfer", disable=not progress, dynamic_ncols=True)
    for d, point in enumerate(branch_points):
        for i, t in enumerate(tasks):
            for a, source in enumerate(tasks):
                torch.manual_seed(cfg.seed)
                model, frozen = transfer_model(models[t], models[source], point)
                retrain(model, frozen, t, loader, steps=steps, lr=cfg.optim.lr)
                losses[d, i, a] = per_sample_losses(model, t, samples)
                bar.update()
    bar.close()
    return np.stack([transfer_affinity(losses[d]) for d in range(len(branch_points))]), losses


def compute_task_affinity(cfg: MTLConfig, *, method: str, runs_dir: Path, num_images: int = 500,
                          transfer_steps: int = 50, single_task_results: Optional[str] = None,
                          progress: bool = True) -> Dict[str, object]:
    """Affinity [D, N, N] of the tasks of ``cfg`` at ``cfg.model.branch_points`` with ``method`` (rsa | transfer)."""
    if method not in METHODS:
        raise KeyError(f"unknown affinity method {method!r}; known: {', '.join(METHODS)}")
    points = check_branch_points(cfg.model.branch_points)
    models = single_task_models(cfg, runs_dir, single_task_results=single_task_results)
    samples = held_out_samples(cfg, num_images)
    logger.info("%s affinity of %s at stages %s on %d held-out images", method, list(models), points, len(samples))
    extra: Dict[str, object] = {}
    if method == "rsa":
        size = tuple(cfg.data.crop_size) if cfg.data.crop_size else tuple(samples[0]["image"].shape[-2:])
        affinity = rsa_affinity_tensor(models, samples, points, size=size)
    else:
        affinity, extra["losses"] = transfer_affinity_tensor(cfg, models, samples, points, steps=transfer_steps,
                                                             progress=progress)
    return {"affinity": affinity, "tasks": list(models), "branch_points": points, "method": method,
            "num_images": len(samples), **extra}
