"""Multi-task finetuning run: ``run_finetune(cfg)`` sets everything up, trains, evaluates, writes results.

The run directory (``cfg.output_dir``) holds config.yaml, checkpoint.pth (atomic, resumed automatically),
TensorBoard events, model_report.json and results.json.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from selfsup.checkpoint import (CheckpointMismatchError, last_checkpoint, load_backbone_weights, load_checkpoint,
                                load_model_state, load_optimizer_state, resume_hint, rng_state, save_checkpoint,
                                set_rng_state)
from selfsup.config import ConfigError, save_config, to_dict
from selfsup.distributed import barrier, init_distributed
from selfsup.logs import ScalarWriter, setup_early_logging, setup_logging
from selfsup.preemption import PreemptionHandler
from selfsup.rundir import open_run_dir
from selfsup.schedule import poly_lr

from .balancers import Balancer, SharedParts, build_balancer
from .config import HARMLESS_KEYS, MTLConfig, depth_init_value
from .data import build_loaders, dataset_ids, mean_train_depth, resolve_crop_size
from .edge_metric import edge_eval_ids
from .delta import (MissingSingleTaskResults, UndefinedDelta, delta_mtl, load_single_task_results,
                    record_single_task_result)
from .engine import evaluate, train_one_epoch
from .flops import format_report, model_cost, relative_report
from .losses import MultiTaskLoss
from .models import build_model, init_output_bias
from .tasks import TASKS, TaskSet, loss_weights

logger = logging.getLogger(__name__)


def task_set(cfg: MTLConfig) -> TaskSet:
    return TaskSet(cfg.data.dataset, tuple(cfg.data.tasks), tuple(cfg.data.auxiliary_tasks),
                   outputs=dict(cfg.model.num_outputs) or None)


def model_from_config(cfg: MTLConfig, *, arch: str | None = None, tasks: TaskSet | None = None) -> nn.Module:
    m = cfg.model
    return build_model(arch or m.arch, tasks=tasks or task_set(cfg), backbone=m.backbone, output_stride=m.output_stride,
                       neck=m.neck, fpn_channels=m.fpn_channels, head=m.head, head_channels=m.head_channels,
                       task_channels=m.task_channels, aspp_rates=m.aspp_rates, widths=m.widths,
                       fpm_softmax=m.fpm_softmax, fpm_reduction=m.fpm_reduction, astmt_options=m.astmt,
                       fusion_options=m.fusion, mtan_options=m.mtan,
                       branching=m.branching, branch_points=m.branch_points)


_REPORTS: Dict[str, Dict[str, Any]] = {}  # model_report per (model config, tasks, crop size), for this process


def model_report(cfg: MTLConfig) -> Dict[str, Any]:
    """Params and FLOPs at the training crop size, relative to one single-task model per main task.

    Counting runs the models on the meta device through torch's FLOP counter (~1 s per model in Python
    dispatch for MTI-Net's interpolations); a resumed or repeated run of the same model in this process
    reuses the report."""
    tasks = task_set(cfg)
    size = resolve_crop_size(cfg.data)
    key = repr((cfg.model, tasks, tuple(size)))
    if key not in _REPORTS:
        _REPORTS[key] = _model_report(cfg, tasks, size)
    return copy.deepcopy(_REPORTS[key])


def _model_report(cfg: MTLConfig, tasks: TaskSet, size: Tuple[int, int]) -> Dict[str, Any]:
    cost = model_cost(lambda: model_from_config(cfg), size)
    single = {t: model_cost(lambda t=t: model_from_config(cfg, arch="single_task", tasks=TaskSet(tasks.dataset, (t,), (),
                                                                                           tasks.outputs)), size)
              for t in tasks.main}
    return {**relative_report(cfg.model.arch, cost, single), "input_size": list(size),
            "single_task": {t: c for t, c in single.items()}}


def init_depth_output(cfg: MTLConfig, tasks: TaskSet, model: nn.Module) -> None:
    """Start the depth prediction layers at ``model.depth_init`` (fresh runs only)."""
    if "depth" not in tasks.all or cfg.model.depth_init == "none":
        return
    value = depth_init_value(cfg.model.depth_init)
    if value is None:
        value = mean_train_depth(cfg.data)
    layers = init_output_bias(model, "depth", value)
    logger.info("depth output: bias %.3f m in %d prediction layer(s) (model.depth_init=%s)", value, layers,
                cfg.model.depth_init)


def init_task_checkpoints(cfg: MTLConfig, model: nn.Module) -> None:
    """Start each task's branch from its single-task run (``model.task_checkpoints``; cross_stitch, nddr)."""
    if not cfg.model.task_checkpoints:
        return
    if not hasattr(model, "load_task_checkpoints"):
        raise ValueError(f"model.task_checkpoints is set, but model.arch={cfg.model.arch} has no per-task branches "
                         "to load them into (cross_stitch, nddr have)")
    model.load_task_checkpoints(dict(cfg.model.task_checkpoints))
    logger.info("task branches from single-task checkpoints: %s", dict(cfg.model.task_checkpoints))


def scale_backbone_lr(net: nn.Module, groups: List[Dict[str, Any]], scale: float) -> List[Dict[str, Any]]:
    """Split each parameter group into its backbone part (``lr_scale`` × ``scale``) and the rest."""
    from .encoder import Encoder

    if scale <= 0:
        raise ValueError(f"optim.backbone_lr_scale={scale!r}: must be > 0")
    backbone = {id(p) for m in net.modules() if isinstance(m, Encoder) for p in m.backbone.parameters()}
    if not backbone:
        raise ValueError(f"optim.backbone_lr_scale={scale!r}: this model has no shared-encoder backbone to scale")
    out: List[Dict[str, Any]] = []
    for group in groups:
        ps = list(group["params"])
        for part, group_scale in (([p for p in ps if id(p) in backbone], scale), ([p for p in ps if id(p) not in backbone], 1.0)):
            if part:
                out.append({**group, "params": part, "lr_scale": group.get("lr_scale", 1.0) * group_scale})
    return out


def build_optimizer(cfg: MTLConfig, model: nn.Module, balancer: Balancer | None = None) -> torch.optim.Optimizer:
    """Adam / SGD over the trainable parameters, plus the balancer's learned ones (uncertainty's log σ²) without
    weight decay. A model with ``param_groups()`` (e.g. ASTMT) gives its own groups, each may carry ``lr_scale``
    (the engine sets ``lr = schedule × lr_scale``)."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    params = (list(net.param_groups()) if hasattr(net, "param_groups")
              else [{"params": [p for p in model.parameters() if p.requires_grad]}])
    if cfg.optim.backbone_lr_scale != 1.0:
        params = scale_backbone_lr(net, params, cfg.optim.backbone_lr_scale)
    if balancer is not None and list(balancer.parameters()):
        params.append({"params": list(balancer.parameters()), "weight_decay": 0.0})
    o = cfg.optim
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=False)
    raise ValueError(f"unknown optimizer {o.optimizer!r}; known: adam, sgd")


def balancer_shared_parts(cfg: MTLConfig, net: nn.Module, balancer: Balancer) -> SharedParts | None:
    """The shared parts the balancer works on (None for the loss-weighting ones, which need none); a one-line
    error naming ``optim.balancer`` when the model shares nothing between all its tasks."""
    if not balancer.needs_shared:
        return None
    try:
        return SharedParts.of(net, capture_representation=balancer.needs_representation)
    except ValueError as err:
        what = "the output of a part shared by all tasks" if balancer.needs_representation else \
            "parameters shared by all tasks"
        raise ConfigError(f"optim.balancer={cfg.optim.balancer} needs {what}, model.arch={cfg.model.arch} has none "
                          f"({err}); use a loss-weighting balancer: fixed, uncertainty, dwa, dtp, auto_magnitude") from None


def _check_single_task_reference(cfg: MTLConfig, tasks: TaskSet) -> None:
    """Fail before training when an MTL run cannot compute Δ_MTL at the end."""
    if cfg.eval.single_task_results and cfg.model.arch != "single_task":
        reference = load_single_task_results(cfg.eval.single_task_results)
        missing = [t for t in tasks.main if t not in reference]
        if missing:
            raise MissingSingleTaskResults(f"{cfg.eval.single_task_results} has no single-task result for {missing} "
                                           f"(has {sorted(reference)}); run configs/{tasks.dataset.replace('_context', '')}/"
                                           f"single_task_{missing[0]}.yaml with the same --single-task-results first")


def _resume_balancer(balancer: Balancer, state: Dict[str, Any], cfg: MTLConfig, path: Path) -> None:
    """The balancer's state from a checkpoint; another balancer (accepted by --allow-config-change) starts fresh."""
    old = ((state.get("config") or {}).get("optim") or {}).get("balancer", cfg.optim.balancer)
    if old != cfg.optim.balancer:
        logger.warning("%s: balancer state of optim.balancer=%s; optim.balancer=%s starts with fresh state", path, old,
                       cfg.optim.balancer)
        return
    try:
        balancer.load_state_dict(state["balancer"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointMismatchError(f"{path}: the balancer state does not fit optim.balancer={cfg.optim.balancer} "
                                      f"with optim.balancer_args={cfg.optim.balancer_args} "
                                      f"({str(err).strip().splitlines()[0][:200]})") from None


def run_finetune(cfg: MTLConfig) -> Dict[str, Any]:
    """Train and evaluate one multi-task (or single-task) model; returns the results dict."""
    env = init_distributed(device_type="cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    out = Path(cfg.output_dir)
    device = torch.device(f"cuda:{env.local_rank}" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    use_amp, channels_last = cfg.amp and device.type == "cuda", cfg.channels_last and device.type == "cuda"
    torch.manual_seed(cfg.seed + env.rank)
    random.seed(cfg.seed + env.rank)
    np.random.seed(cfg.seed + env.rank)
    tasks = task_set(cfg)
    balancer = build_balancer(cfg.optim.balancer, tasks=tasks.main, args=cfg.optim.balancer_args)  # fail early
    _check_single_task_reference(cfg, tasks)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, crop_size=resolve_crop_size(cfg.data)))
    # everything that can reject the config or the inputs runs before anything is written into the run dir
    setup_early_logging(rank=env.rank)
    report = model_report(cfg)
    logger.info("model: %s", format_report(report))

    model = model_from_config(cfg)
    if cfg.model.weights.lower() != "none":  # models with several backbone copies load them all themselves
        if hasattr(model, "load_backbone_weights"):
            model.load_backbone_weights(cfg.model.weights)
        else:
            load_backbone_weights(model.encoder.backbone, cfg.model.weights)
        logger.info("backbone weights: %s", cfg.model.weights)
    else:
        logger.info("backbone: random init (--weights none)")
    resume = last_checkpoint(out)
    if resume is None:  # a resumed run loads its own biases: skip reading the depth maps
        init_task_checkpoints(cfg, model)
        init_depth_output(cfg, tasks, model)
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if env.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else model
        model = nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    forward_model = torch.compile(model) if cfg.compile else model

    train_loader, val_loader = build_loaders(cfg.data, seed=cfg.seed, distributed=env.world_size > 1)
    criterion = MultiTaskLoss(loss_weights(tasks.dataset, tasks.all, cfg.optim.loss_weights))
    balancer.to(device)
    shared = balancer_shared_parts(cfg, net, balancer)
    optimizer = build_optimizer(cfg, model, balancer)
    iters = len(train_loader) if not cfg.max_iters_per_epoch else min(cfg.max_iters_per_epoch, len(train_loader))
    total_steps = cfg.epochs * iters
    lr_at = lambda step: poly_lr(step, total_steps=total_steps, base_lr=cfg.optim.lr, power=cfg.optim.poly_power)  # noqa: E731

    # rank 0 writes: lock the run dir and check a resume's config before anything is written into it
    run = open_run_dir(out, to_dict(cfg), harmless=HARMLESS_KEYS, allow_change=cfg.allow_config_change) \
        if env.is_main else None
    setup_logging(out, rank=env.rank)
    if run is not None:
        run.log_changes()
        (out / "model_report.json").write_text(json.dumps(report, indent=2))
    resume = last_checkpoint(out)  # (again under the lock)

    start_epoch, step, start_iter, resume_rng = 0, 0, 0, None
    if resume is not None:
        state = load_checkpoint(resume)
        load_model_state(net, state["model"], source=resume,
                         hint=resume_hint(run.accepted_changes if run is not None else []))
        load_optimizer_state(optimizer, state["optimizer"], source=resume)
        if "balancer" in state:
            _resume_balancer(balancer, state, cfg, resume)
        start_epoch, step, start_iter = state["epoch"], state["step"], state.get("step_in_epoch", 0)
        if start_iter:  # mid-epoch: set once that epoch's loader iterator exists, as in the uninterrupted run
            resume_rng = state["rng"]
        else:
            set_rng_state(state["rng"])
        logger.info("resumed from %s at epoch %d%s (step %d)", resume, start_epoch,
                    f", after {start_iter} of its {iters} steps" if start_iter else "", step)

    if run is not None:  # only once the checkpoint fits: a refused resume leaves the run's config.yaml as it was
        save_config(cfg, out / "config.yaml")
    writer = ScalarWriter(out / "tb", enabled=env.is_main)
    edge_ids = (edge_eval_ids(cfg.eval.edge_ids, dataset=tasks.dataset, val_ids=dataset_ids(val_loader.dataset))
                if "edge" in tasks.main else None)
    common = dict(tasks=tasks.main, num_outputs=tasks.channels(), device=device, amp=use_amp, channels_last=channels_last,
                  edge_thresholds=cfg.eval.edge_thresholds, edge_tolerance=cfg.eval.edge_tolerance, edge_ids=edge_ids,
                  progress=cfg.progress and env.is_main)
    last = out / "checkpoint.pth"

    def save(epoch: int, step: int, step_in_epoch: int) -> None:
        """``epoch``: the epoch in progress (``step_in_epoch`` of its steps done), or the next one (0 done)."""
        if env.is_main:
            save_checkpoint({"epoch": epoch, "step_in_epoch": step_in_epoch, "step": step, "arch": cfg.model.arch,
                             "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                             "balancer": balancer.state_dict(), "config": to_dict(cfg), "rng": rng_state()}, last)

    start = time.time()
    with PreemptionHandler() as preemption:
        try:
            for epoch in range(start_epoch, cfg.epochs):
                if hasattr(train_loader.sampler, "set_epoch"):
                    train_loader.sampler.set_epoch(epoch, start=start_iter * cfg.data.batch_size)

                def on_step(s: int, done: int, check_finite: Callable[[], None], epoch: int = epoch) -> None:
                    if done >= iters:
                        return  # the epoch's end checkpoints
                    stop = preemption.should_stop(s, device)
                    if stop or (cfg.checkpoint_every_steps and s % cfg.checkpoint_every_steps == 0):
                        check_finite()  # never overwrite the last good checkpoint with a non-finite state
                        save(epoch, s, done)
                    if stop:
                        raise preemption.stop(f"epoch {epoch}, step {done} of {iters} (global step {s})", last,
                                              is_main=env.is_main)

                step = train_one_epoch(forward_model, train_loader, criterion, optimizer, lr_at=lr_at, step=step,
                                       epoch=epoch, tasks=tasks.all, device=device, amp=use_amp,
                                       channels_last=channels_last, max_iters=cfg.max_iters_per_epoch, writer=writer,
                                       log_every=cfg.log_every, progress=cfg.progress and env.is_main,
                                       balancer=balancer, shared=shared, start_iter=start_iter, rng=resume_rng,
                                       on_step=on_step)
                start_iter, resume_rng = 0, None
                saved = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs
                if saved:
                    save(epoch + 1, step, 0)
                if preemption.should_stop(step, device, force=True):
                    if not saved:
                        save(epoch + 1, step, 0)
                    raise preemption.stop(f"the end of epoch {epoch} (global step {step})", last, is_main=env.is_main)
                if env.is_main and cfg.eval.every and (epoch + 1) % cfg.eval.every == 0 and epoch + 1 < cfg.epochs:
                    vis = cfg.vis_every and (epoch + 1) % cfg.vis_every == 0
                    metrics = evaluate(net, val_loader, writer=writer if vis else None, step=step, **common)
                    for t, values in metrics.items():
                        writer.scalars(values, step, prefix=f"val/{t}/")
                    logger.info("epoch %d: %s", epoch + 1, _summary(metrics))
                barrier()
        except BaseException:
            writer.close()
            if run is not None:
                run.close()
            raise
    train_time = time.time() - start

    results: Dict[str, Any] = {}
    if env.is_main:
        metrics = evaluate(net, val_loader, writer=writer if cfg.vis_every else None, step=step, **common)
        for t, values in metrics.items():
            writer.scalars(values, step, prefix=f"val/{t}/")
        results = _results(cfg, tasks, metrics, report, train_time)
        results.update(balancer=cfg.optim.balancer, balancer_args=dict(cfg.optim.balancer_args),
                       balancer_weights=balancer.weights())
        if results.get("delta_mtl") is not None:
            writer.scalars({"delta_mtl": results["delta_mtl"]}, step, prefix="val/")
        (out / "results.json").write_text(json.dumps(results, indent=2))
        logger.info("results: %s%s", _summary(metrics),
                    "" if results.get("delta_mtl") is None else f" | Δ_MTL {results['delta_mtl']:+.2f}%")
        writer.close()
        run.close()
    barrier()
    return results


def _results(cfg: MTLConfig, tasks: TaskSet, metrics: Dict[str, Dict[str, float]], report: Dict[str, Any],
             train_time: float) -> Dict[str, Any]:
    results: Dict[str, Any] = {"arch": cfg.model.arch, "dataset": tasks.dataset, "tasks": list(tasks.main),
                               "auxiliary_tasks": list(tasks.auxiliary), "backbone": cfg.model.backbone,
                               "weights": cfg.model.weights, "epochs": cfg.epochs, "metrics": metrics,
                               "params": report["params"], "flops": report["flops"], "params_rel": report["params_rel"],
                               "flops_rel": report["flops_rel"], "train_time_s": train_time, "delta_mtl": None}
    path = cfg.eval.single_task_results
    if path and cfg.model.arch == "single_task":
        record_single_task_result(path, tasks.main[0], metrics[tasks.main[0]],
                                  extra={"params": report["params"], "flops": report["flops"]})
    elif path:
        try:
            results["delta_mtl"] = delta_mtl(metrics, load_single_task_results(path), tasks.main)
        except UndefinedDelta as err:  # the run's metrics are kept; only Δ_MTL is missing
            logger.warning("%s", err)
    return results


def _summary(metrics: Dict[str, Dict[str, float]]) -> str:
    return ", ".join(f"{t} {TASKS[t].metric} {v[TASKS[t].metric]:.4g}" for t, v in metrics.items())
