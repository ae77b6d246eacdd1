"""One-process shuffle-BN in one forward: every BatchNorm computes its statistics per group of the batch.

Equivalent to encoding the ``G`` groups one after the other (same outputs, same running statistics, same
``num_batches_tracked``), with one forward of the whole batch instead of ``G`` small ones.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn

_BN = nn.modules.batchnorm._BatchNorm


def grouped_batch_norm_forward(bn: _BN, groups: int, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` with batch statistics per group of ``x.shape[0] // groups`` consecutive rows.

    x: [G*b, C, ...] (BatchNorm1d/2d/3d inputs, any memory format); statistics in fp32.
    """
    if not bn.training or groups == 1:
        return type(bn).forward(bn, x)
    n, c = x.shape[:2]
    if n % groups:
        raise ValueError(f"grouped BN: batch {n} is not divisible by {groups} groups")
    xg = x.view(groups, n // groups, *x.shape[1:])  # [G, b, C, ...]
    dims = (1,) + tuple(range(3, xg.dim()))
    xf = xg.float()
    var, mean = torch.var_mean(xf, dim=dims, correction=0, keepdim=True)  # [G, 1, C, 1, ...]
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        w = bn.weight.float().view(1, 1, c, *[1] * (xg.dim() - 3))
        scale, shift = scale * w, shift * w + bn.bias.float().view_as(w)
    y = (xf * scale + shift).to(x.dtype).view_as(x)
    if bn.track_running_stats and bn.running_mean is not None:
        count = xg[0].numel() // c  # elements per channel and group
        _update_running_stats(bn, mean.view(groups, c), var.view(groups, c) * (count / max(count - 1, 1)))
    return y


@torch.no_grad()
def _update_running_stats(bn: _BN, means: torch.Tensor, unbiased_vars: torch.Tensor) -> None:
    """The G sequential running-average updates of G per-group forwards, in closed form."""
    groups = means.shape[0]
    if bn.momentum is None:  # cumulative average: the factor changes with every update
        for g in range(groups):
            bn.num_batches_tracked.add_(1)
            f = 1.0 / (bn.num_batches_tracked.to(means.dtype))
            bn.running_mean.mul_(1 - f).add_(f * means[g])
            bn.running_var.mul_(1 - f).add_(f * unbiased_vars[g])
        return
    m = float(bn.momentum)
    # r_G = (1-m)^G r_0 + sum_g m (1-m)^(G-1-g) s_g
    powers = torch.arange(groups - 1, -1, -1, device=means.device, dtype=means.dtype)
    w = m * torch.pow(1 - m, powers)  # [G]
    decay = (1 - m) ** groups
    bn.running_mean.mul_(decay).add_((w @ means).to(bn.running_mean.dtype))
    bn.running_var.mul_(decay).add_((w @ unbiased_vars).to(bn.running_var.dtype))
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(groups)


@contextlib.contextmanager
def grouped_batch_norm(module: nn.Module, groups: int) -> Iterator[None]:
    """Inside the block, every BatchNorm of ``module`` (not SyncBatchNorm) uses per-group statistics."""
    bns = [m for m in module.modules() if isinstance(m, _BN) and not isinstance(m, nn.SyncBatchNorm)]
    for bn in bns:
        bn.forward = functools.partial(grouped_batch_norm_forward, bn, groups)
    try:
        yield
    finally:
        for bn in bns:
            del bn.forward
