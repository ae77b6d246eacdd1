"""Training epoch and evaluation loops (setup lives in train.py)."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from selfsup.checkpoint import set_rng_state
from selfsup.logs import ScalarWriter
from selfsup.nan_guard import NonFiniteGuard

from .balancers import Balancer, SharedParts, task_kpis
from .balancers.fixed import Fixed
from .data import targets_of
from .losses import MultiTaskLoss
from .metrics import build_meter, postprocess
from .visualize import prediction_grid

logger = logging.getLogger(__name__)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs in fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def balanced_step(model: nn.Module, images: torch.Tensor, targets: Mapping[str, torch.Tensor], criterion: MultiTaskLoss,
                  balancer: Balancer, *, shared: Optional[SharedParts], step: int, epoch: int, device: torch.device,
                  amp: bool = True):
    """Forward, per-task losses, the balancer's backward (gradients in ``.grad``); returns (total, terms).

    The main tasks' losses go to the balancer; the others (auxiliary tasks) are ``extra`` with their config
    weight. Balancers that reduce the gradients themselves run forward + backward under DDP's ``no_sync()``.
    """
    no_sync = getattr(model, "no_sync", None) if balancer.reduces_gradients else None
    with no_sync() if no_sync is not None else contextlib.nullcontext():
        with autocast(device, amp):
            outputs = model(images)
        losses, terms = criterion.per_task(outputs, targets)  # losses in fp32
        extra = sum((v for t, v in losses.items() if t not in balancer.tasks), torch.zeros((), device=device))
        kpi = task_kpis(balancer.tasks, outputs["final"], targets) if balancer.needs_kpi else None
        total = balancer.backward(losses, extra=extra, shared=shared, step=step, epoch=epoch, kpi=kpi)
    return total, terms


def train_one_epoch(model: nn.Module, loader, criterion: MultiTaskLoss, optimizer: torch.optim.Optimizer, *,
                    lr_at: Callable[[int], float], step: int, epoch: int, tasks: Sequence[str], device: torch.device,
                    amp: bool = True, channels_last: bool = False, max_iters: int = 0,
                    writer: Optional[ScalarWriter] = None, log_every: int = 20, progress: bool = True,
                    nan_check_every: int = 50, balancer: Optional[Balancer] = None,
                    shared: Optional[SharedParts] = None, start_iter: int = 0,
                    rng: Optional[Mapping] = None,
                    on_step: Optional[Callable[[int, int, Callable[[], None]], None]] = None) -> int:
    """One pass over ``loader`` (at most ``max_iters`` batches); returns the global step after it.

    A run resumed mid-epoch passes ``start_iter`` (the batches of this epoch it already trained; the loader's
    sampler skips them) and ``rng``, the checkpoint's RNG state, set once the loader's iterator exists.
    ``on_step(step, batches_done, check_finite)`` runs after every optimizer step (mid-epoch checkpoints,
    preemption); it calls ``check_finite()`` before it writes a checkpoint.

    ``balancer`` (default: fixed weights) weighs the per-task losses of the tasks it was built for (the main
    tasks); the other terms (auxiliary tasks, a model's extra losses) enter with their config weight as
    ``extra``. ``shared`` is what gradient-based balancers need (``SharedParts.of(model)``).
    No step waits on the device: losses are read back at log steps only, the NaN/Inf flag every
    ``nan_check_every`` steps and at the end of the epoch (before the caller checkpoints).
    """
    model.train()
    guard = NonFiniteGuard(nan_check_every)
    balancer = balancer if balancer is not None else Fixed(list(tasks))
    full = len(loader) + start_iter
    num_iters = full if not max_iters else min(max_iters, full)
    bar = tqdm(total=num_iters, initial=start_iter, desc=f"epoch {epoch}", disable=not progress, leave=False,
               dynamic_ncols=True)

    def check_finite() -> None:
        guard.check(model.parameters())

    try:
        batches = iter(loader)
        if rng is not None:
            set_rng_state(rng)
        for i, batch in enumerate(batches, start=start_iter):
            if i >= num_iters:
                break
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            images = to_device(batch["image"], device, channels_last)
            targets = targets_of(batch, list(tasks), device)
            optimizer.zero_grad(set_to_none=True)
            total, terms = balanced_step(model, images, targets, criterion, balancer, shared=shared, step=step, epoch=epoch,
                                         device=device, amp=amp)
            guard.update(total, f"step {step}")
            optimizer.step()
            step += 1
            bar.update()
            if guard.due(step):
                guard.check()
            if step % log_every == 0 or i == num_iters - 1:
                loss_value = float(total.detach())
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
                if writer is not None:
                    writer.scalars({"loss": loss_value, "lr": lr, **{k: float(v) for k, v in terms.items()},
                                    **{f"balancer/{t}": w for t, w in balancer.weights().items()}}, step, prefix="train/")
            if on_step is not None:
                on_step(step, i + 1, check_finite)
        guard.check(model.parameters())
    finally:
        bar.close()  # (also on an error: its line is cleared before the one-line message)
    return step


def same_size_groups(sizes: Sequence[Tuple[int, int]]) -> List[List[int]]:
    """Indices of a batch grouped by original image size (first-seen order)."""
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    return list(groups.values())


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, sizes: Sequence[Tuple[int, int]], tasks: Sequence[str], *,
            amp: bool = True) -> List[Dict[str, torch.Tensor]]:
    """Per-image predictions at each image's original size, independent of the other images of the batch.

    Images of one size go through one forward without padding; padding would enter global poolings (SE blocks,
    ASPP image pooling) and make a prediction depend on its batch neighbours.
    """
    out: List[Dict[str, torch.Tensor]] = [{} for _ in sizes]
    for group in same_size_groups(sizes):
        H, W = sizes[group[0]]
        with autocast(images.device, amp):
            outputs = model(images[group, :, :H, :W])["final"]
        for t in tasks:
            prediction = postprocess(t, outputs[t]).cpu()
            for j, i in enumerate(group):
                out[i][t] = prediction[j]
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, tasks: Sequence[str], num_outputs: Mapping[str, int], device: torch.device,
             amp: bool = True, channels_last: bool = False, edge_thresholds: int = 99, edge_tolerance: float = 0.0075,
             edge_ids: Optional[Collection[str]] = None, progress: bool = True, writer: Optional[ScalarWriter] = None,
             step: int = 0) -> Dict[str, Dict[str, float]]:
    """Metrics of the main ``tasks`` at each image's original size; edges only on ``edge_ids`` (None = all)."""
    model.eval()
    meters = {t: build_meter(t, num_outputs=num_outputs[t], edge_thresholds=edge_thresholds,
                             edge_tolerance=edge_tolerance) for t in tasks}
    first = True
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        images = to_device(batch["image"], device, channels_last)
        sizes = [tuple(meta["size"]) for meta in batch["meta"]]
        predictions = predict(model, images, sizes, tasks, amp=amp)
        for i, meta in enumerate(batch["meta"]):
            H, W = sizes[i]
            for t in tasks:
                if t == "edge" and edge_ids is not None and meta["id"] not in edge_ids:
                    continue
                meters[t].update(predictions[i][t], batch[t][i, ..., :H, :W])
        if first and writer is not None:
            grid = {t: _pad_stack([p[t] for p in predictions]) for t in tasks}
            writer.image("val/predictions", prediction_grid(batch["image"], grid, batch, tasks), step)
            first = False
    return {t: meter.compute() for t, meter in meters.items()}


def _pad_stack(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-image maps of different sizes (zero padding bottom/right) for the preview grid."""
    H, W = max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps)
    return torch.stack([torch.nn.functional.pad(m, (0, W - m.shape[-1], 0, H - m.shape[-2])) for m in maps])
