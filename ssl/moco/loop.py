"""MoCo pretraining: ``train_one_epoch`` (the loop) and ``run_pretraining`` (set-up, resume, epochs)."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn
from tqdm import tqdm

from selfsup import checkpoint as ckpt
from selfsup.config import ConfigError, save_config, to_dict, upgrade_keys
from selfsup.distributed import all_gather, get_world_size, init_distributed
from selfsup.logs import ScalarWriter, setup_early_logging, setup_logging
from selfsup.moco.config import HARMLESS_KEYS, OptimConfig, PretrainConfig, knn_warmup_epochs
from selfsup.moco.model import MoCo
from selfsup.nan_guard import NonFiniteGuard
from selfsup.preemption import PreemptionHandler
from selfsup.rundir import open_run_dir
from selfsup.schedule import cosine_lr

logger = logging.getLogger(__name__)


@dataclass
class StepState:
    """Where the run is: the epoch, the step inside it and the global step."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


class StopTraining(Exception):
    """Raised to end a run early (``train.max_steps``); the checkpoint is already written."""


def build_model(cfg: PretrainConfig, device: torch.device) -> MoCo:
    model = MoCo(arch=cfg.model.backbone, hidden_dim=cfg.model.hidden_dim, dim=cfg.model.dim,
                 queue_size=cfg.moco.queue_size, temperature=cfg.moco.temperature, knn_k=cfg.moco.knn_k,
                 knn_weight=cfg.moco.knn_weight, shuffle_bn_groups=cfg.model.shuffle_bn_groups,
                 backbone_queue_dtype=getattr(torch, cfg.moco.backbone_queue_dtype),
                 sync_bn=cfg.model.bn == "sync" and get_world_size() > 1, head_bn=cfg.model.head_bn,
                 symmetric=cfg.moco.symmetric)
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed view sizes: pick the fastest convolution algorithms once
    if device.type == "cuda" and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(cfg: OptimConfig, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """SGD with momentum (MoCo-v2) or AdamW (``optim.name: adamw``, betas (0.9, ``optim.beta2``))."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.momentum, cfg.beta2), weight_decay=cfg.weight_decay)


def monitor_status(history: List[Dict[str, float]]) -> Dict[str, str]:
    """The last monitor values for the progress bar, beside their value at initialisation (epoch 0)."""
    if not history:
        return {}
    first, last = history[0], history[-1]
    return {k: (f"{last[k]:.1f}" if last is first else f"{last[k]:.1f} (init {first[k]:.1f})")
            for k in ("knn_acc", "davis_jf", "retrieval_miou") if k in last}


def train_one_epoch(model: MoCo, loader: Iterable[List[torch.Tensor]], optimizer: torch.optim.Optimizer, *,
                    lr_at: Callable[[int], float], cfg: PretrainConfig, state: StepState, device: torch.device,
                    writer: ScalarWriter, on_step_end: Callable[[StepState], None], steps: int,
                    query_encoder: Optional[nn.Module] = None, guard: Optional[NonFiniteGuard] = None,
                    status: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """One epoch of MoCo steps from ``state.step_in_epoch`` to ``steps``; returns the epoch's mean loss.

    No step waits on the device: losses are read back only every ``train.log_every_steps``, the NaN/Inf
    flag every ``train.nan_check_every`` steps (``guard``; ``on_step_end`` checks it before a checkpoint).
    ``status`` (e.g. the last kNN monitor value) is shown on the progress bar beside the loss.
    """
    model.train()
    amp = cfg.train.amp and device.type == "cuda"
    use_knn = cfg.moco.knn_k > 0 and state.epoch >= knn_warmup_epochs(cfg.moco.knn_warmup_epochs, cfg.train.epochs)
    guard = guard or NonFiniteGuard(cfg.train.nan_check_every)
    where = _untouched(cfg)
    total_loss, count = torch.zeros((), device=device), 0
    data_time = compute_time = 0.0
    images_seen = 0
    progress = tqdm(total=steps, initial=state.step_in_epoch, desc=f"epoch {state.epoch}",
                    disable=not writer.enabled, dynamic_ncols=True, leave=False)
    end = time.perf_counter()
    try:
        for views in loader:
            start = time.perf_counter()
            data_time += start - end
            lr = lr_at(state.global_step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + state.global_step)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                out, (keys, backbone_keys) = model(views, momentum=cfg.moco.momentum, use_knn=use_knn,
                                                   generator=generator, query_encoder=query_encoder)
            loss = out["loss"]
            loss_value = all_gather(loss.detach().reshape(1)).mean()
            guard.update(loss_value, f"epoch {state.epoch}, step {state.step_in_epoch} (global step {state.global_step})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.enqueue(keys, backbone_keys)  # after the loss: this step's keys are not its own negatives
            total_loss += loss_value.detach()
            count += 1
            images_seen += views[0].shape[0] * get_world_size()
            end = time.perf_counter()
            compute_time += end - start
            state.step_in_epoch += 1
            state.global_step += 1
            progress.update(1)
            if guard.due(state.global_step):
                guard.check(where=where)
            if state.global_step % cfg.train.log_every_steps == 0:
                elapsed = data_time + compute_time
                scalars = {k: v.item() for k, v in out.items()}
                scalars.update(lr=lr, queue_fill=min(1.0, model.num_enqueued.item() / model.queue_size),
                               images_per_s=images_seen / max(elapsed, 1e-9), data_time_fraction=data_time / max(elapsed, 1e-9))
                writer.scalars(scalars, state.global_step, prefix="train/")
                progress.set_postfix(loss=f"{scalars['loss']:.3f}", lr=f"{lr:.3g}", **(status or {}))
                data_time = compute_time = 0.0
                images_seen = 0
            epoch_done = state.step_in_epoch >= steps
            on_step_end(state)  # checkpoints; rolls the state over to the next epoch
            if epoch_done:
                break
    finally:
        progress.close()  # (also on an error: its line is cleared before the one-line message)
    return {"loss": total_loss.item() / max(count, 1)}


def run_pretraining(cfg: PretrainConfig) -> Dict[str, Any]:
    """Set up (distributed, data, model, optimiser), resume from ``cfg.output_dir`` if possible, train."""
    from selfsup.moco.pipeline import build_loader  # data set-up lives beside the loop
    from selfsup.monitors import build_monitors, log_monitors

    device = _device(cfg.train.device)
    env = init_distributed(device_type=device.type)
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    run_dir = Path(cfg.output_dir)
    setup_early_logging(rank=env.rank)  # nothing is written into run_dir before the config and data are checked
    torch.manual_seed(cfg.train.seed)
    global_batch = cfg.optim.batch_size
    if global_batch % env.world_size:
        raise ConfigError(f"optim.batch_size={global_batch} must be divisible by the world size {env.world_size}")
    if cfg.moco.queue_size % global_batch:
        raise ConfigError(f"moco.queue_size={cfg.moco.queue_size} must be divisible by optim.batch_size={global_batch}")

    model = build_model(cfg, device)
    query_encoder: Optional[nn.Module] = None
    if env.world_size > 1:
        query_encoder = nn.parallel.DistributedDataParallel(
            model.encoder_q, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.model.compile:
        model.encoder_q.backbone.compile()
    base_lr = cfg.optim.lr * global_batch / 256
    optimizer = build_optimizer(cfg.optim, model.encoder_q.parameters(), base_lr)
    loader = build_loader(cfg, env, device)
    steps = len(loader) if cfg.train.steps_per_epoch <= 0 else min(len(loader), cfg.train.steps_per_epoch)
    total_steps = steps * cfg.train.epochs
    # rank 0 writes: lock the run dir and check a resume's config before anything is written into it
    run = open_run_dir(run_dir, to_dict(cfg), harmless=HARMLESS_KEYS, allow_change=cfg.allow_config_change,
                       upgrade=lambda old: upgrade_keys(PretrainConfig, old)) if env.is_main else None
    setup_logging(run_dir, rank=env.rank)
    if run is not None:
        run.log_changes()

    def lr_at(step: int) -> float:
        return cosine_lr(step, total_steps=total_steps, base_lr=base_lr, warmup_steps=cfg.optim.warmup_epochs * steps)

    state = StepState()
    last = ckpt.last_checkpoint(run_dir)
    if last is not None:
        state = _resume(last, model, optimizer, changes=run.accepted_changes if run is not None else [])
        logger.info("resumed from %s at epoch %d step %d (global step %d)", last, state.epoch,
                    state.step_in_epoch, state.global_step)
    if run is not None:  # only once the checkpoint fits: a refused resume leaves the run's config.yaml as it was
        save_config(cfg, run_dir / "config.yaml")
    writer = ScalarWriter(run_dir, enabled=env.is_main)
    monitor = build_monitors(cfg, device) if env.is_main else None

    guard = NonFiniteGuard(cfg.train.nan_check_every)

    def save(s: StepState) -> None:
        guard.check(model.encoder_q.parameters(), where=_untouched(cfg))
        if env.is_main:
            ckpt.save_checkpoint(_checkpoint_state(cfg, model, optimizer, s), run_dir / ckpt.LAST)

    preemption = PreemptionHandler()  # SIGTERM / SIGUSR1: checkpoint at this step, exit 75 (selfsup.preemption)

    def on_step_end(s: StepState) -> None:
        done_epoch = s.step_in_epoch >= steps
        if done_epoch:
            s.epoch, s.step_in_epoch = s.epoch + 1, 0
        stop = preemption.should_stop(s.global_step, device, force=done_epoch)
        if (done_epoch or stop or s.global_step % cfg.train.checkpoint_every_steps == 0
                or s.global_step == cfg.train.max_steps):
            save(s)
        if stop:
            raise preemption.stop(f"epoch {s.epoch}, step {s.step_in_epoch} (global step {s.global_step})",
                                  run_dir / ckpt.LAST, is_main=env.is_main)
        if cfg.train.max_steps and s.global_step >= cfg.train.max_steps:
            raise StopTraining

    history = []
    if monitor is not None and state.global_step == 0:
        log_monitors(monitor, model.encoder_q.backbone, epoch=0, step=0, writer=writer, history=history)
    try:
        preemption.__enter__()
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch
            loader.set_epoch(epoch, start_step=state.step_in_epoch)
            stats = train_one_epoch(model, loader, optimizer, lr_at=lr_at, cfg=cfg, state=state, device=device,
                                    writer=writer, on_step_end=on_step_end, steps=steps, query_encoder=query_encoder,
                                    guard=guard, status=monitor_status(history))
            skipped = loader.dataset.num_skipped
            logger.info("epoch %d: loss %.4f%s", epoch, stats["loss"], f" ({skipped} unreadable images skipped)" if skipped else "")
            writer.scalars({"skipped_images": skipped}, state.global_step, prefix="data/")
            if monitor is not None and ((epoch + 1) % cfg.train.knn_every_epochs == 0 or epoch + 1 == cfg.train.epochs):
                log_monitors(monitor, model.encoder_q.backbone, epoch=epoch + 1, step=state.global_step,
                             writer=writer, history=history)
    except StopTraining:
        logger.info("stopped after %d steps (train.max_steps); resume by running the same command", state.global_step)
    finally:
        preemption.__exit__(*sys.exc_info())
        writer.close()
        if run is not None:
            run.close()
    return {"global_step": state.global_step, "epoch": state.epoch, "knn": history,
            "skipped_images": loader.dataset.num_skipped}


def _untouched(cfg: PretrainConfig) -> str:
    return f"; the last good checkpoint in {cfg.output_dir} is untouched"


def _checkpoint_state(cfg: PretrainConfig, model: MoCo, optimizer: torch.optim.Optimizer, s: StepState) -> Dict[str, Any]:
    return {"epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.global_step,
            "arch": cfg.model.backbone, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": None, "config": to_dict(cfg), "rng": ckpt.rng_state()}


def _resume(path: Path, model: MoCo, optimizer: torch.optim.Optimizer, changes=()) -> StepState:
    state = ckpt.load_checkpoint(path)
    ckpt.load_model_state(model, state["model"], source=path, hint=ckpt.resume_hint(changes))
    ckpt.load_optimizer_state(optimizer, state["optimizer"], source=path)
    ckpt.set_rng_state(state["rng"])
    return StepState(epoch=state["epoch"], step_in_epoch=state["step_in_epoch"], global_step=state["global_step"])


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available")
    return torch.device(name)
