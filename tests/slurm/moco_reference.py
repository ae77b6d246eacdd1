"""The one-process twin of a W-rank MoCo run, for the cross-host equivalence tests of tests/test_slurm.py.

A W-rank run (one rank per host) and this single process see the same global batch and the same BatchNorm
groups, so they must reach the same queues and weights (to float tolerance):

- data: rank r's loader (``rank=r, world_size=W``, batch B/W) for every r, their batches concatenated in rank
  order = the all-gathered batch of the W-rank run (the order its queue is filled in);
- key encoder: ``model.shuffle_bn_groups = W``: the global key batch is shuffled with the step's generator and
  split into W consecutive groups with their own BN statistics = the slice each rank encodes in shuffle-BN
  across processes (same permutation: both draw it from the same seeded generator);
- query encoder: each rank's slice of every view goes through the encoder on its own (:class:`PerRankQueries`),
  so its BN statistics are those of that rank's local batch, as in DDP; the rows come back in the global
  layout, and the loss (a mean over all rows) equals DDP's mean over ranks of the per-rank means;
- the rest is the library's own code: ``build_model``, ``build_optimizer``, ``cosine_lr`` and
  ``train_one_epoch``, started from ``torch.manual_seed(train.seed)`` as ``run_pretraining`` is.

Not comparable: BatchNorm running statistics (DDP keeps rank 0's for the query encoder and each rank its own
for the key encoder; here they are updated by every group in turn). They are not used in train mode, so they
do not change the trajectory.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from selfsup.distributed import DistEnv
from selfsup.logs import ScalarWriter
from selfsup.moco.pipeline import build_loader
from selfsup.moco.loop import StepState, build_model, build_optimizer, train_one_epoch
from selfsup.schedule import cosine_lr


class PerRankQueries(nn.Module):
    """``encoder([views])`` with each of the W ranks' slices encoded separately; rows in the global layout."""

    def __init__(self, encoder: nn.Module, world_size: int) -> None:
        super().__init__()
        self.encoder, self.world_size = encoder, world_size

    def forward(self, views: List[torch.Tensor]):
        per_rank = views[0].shape[0] // self.world_size
        outs = [self.encoder([v[r * per_rank:(r + 1) * per_rank] for v in views]) for r in range(self.world_size)]

        def global_layout(parts: List[torch.Tensor]) -> torch.Tensor:  # [W][V*b, C] -> [V*W*b, C], view-major
            stacked = torch.stack([p.view(len(views), per_rank, -1) for p in parts], dim=1)
            return stacked.reshape(len(views) * self.world_size * per_rank, -1)

        return global_layout([o[0] for o in outs]), global_layout([o[1] for o in outs])


def initial_state(cfg) -> Dict[str, torch.Tensor]:
    """The model's state at step 0 (same seed as ``run_pretraining``)."""
    torch.manual_seed(cfg.train.seed)
    return compared_state(build_model(cfg, torch.device("cpu")).state_dict())


def train_one_process(cfg, world_size: int, steps: int, *, per_rank_queries: bool = True) -> Dict[str, torch.Tensor]:
    """Train ``steps`` global steps as one process; return the compared state (see :func:`compared_state`).

    ``per_rank_queries=False``: the query encoder sees the whole batch (one BN group): must NOT match.
    """
    if cfg.model.shuffle_bn_groups != world_size:
        raise ValueError(f"model.shuffle_bn_groups={cfg.model.shuffle_bn_groups}: must be the world size {world_size}")
    device = torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, device)
    base_lr = cfg.optim.lr * cfg.optim.batch_size / 256
    optimizer = build_optimizer(cfg.optim, model.encoder_q.parameters(), base_lr)
    loaders = [build_loader(cfg, DistEnv(rank=r, world_size=world_size), device) for r in range(world_size)]
    per_epoch = len(loaders[0]) if cfg.train.steps_per_epoch <= 0 else min(len(loaders[0]), cfg.train.steps_per_epoch)
    total = per_epoch * cfg.train.epochs
    state = StepState()

    def lr_at(step: int) -> float:
        return cosine_lr(step, total_steps=total, base_lr=base_lr, warmup_steps=cfg.optim.warmup_epochs * per_epoch)

    def on_step_end(s: StepState) -> None:
        if s.step_in_epoch >= per_epoch:
            s.epoch, s.step_in_epoch = s.epoch + 1, 0

    queries = PerRankQueries(model.encoder_q, world_size) if per_rank_queries else None
    writer = ScalarWriter(cfg.output_dir, enabled=False)
    while state.global_step < steps:
        for loader in loaders:
            loader.set_epoch(state.epoch, start_step=state.step_in_epoch)
        batches = (
            [torch.cat(parts) for parts in zip(*rank_views)] for rank_views in zip(*loaders))
        train_one_epoch(model, batches, optimizer, lr_at=lr_at, cfg=cfg, state=state, device=device, writer=writer,
                        on_step_end=on_step_end, steps=min(per_epoch, state.step_in_epoch + steps - state.global_step),
                        query_encoder=queries)
    return compared_state(model.state_dict())


def compared_state(model_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The queues, their pointer and counter, and every parameter of both encoders (no BN running statistics)."""
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return {k: v for k, v in model_state.items() if not k.endswith(skip)}
