"""Host-to-device transfers that never make the host wait on the device.

``upload`` copies a host tensor through pinned memory with ``non_blocking`` (a plain ``.to(cuda)`` from
pageable memory blocks the host until the device has drained its queue); ``constant`` keeps small
constant tensors on each device once, instead of a ``torch.tensor(..., device=cuda)`` copy per call;
``sync_device`` waits for a CUDA device's queue (around timed regions of the benchmarks; nothing on the CPU).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence, Union

import torch


def upload(t: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """``t`` on ``device``; from the host to CUDA through pinned memory, asynchronously.

    The pinned staging buffer comes from PyTorch's caching host allocator, which keeps it alive until
    the copy has finished, so ``t`` may be freed or changed by the caller right after."""
    device = torch.device(device)
    if t.device == device or device.type != "cuda" or t.device.type != "cpu":
        return t.to(device, non_blocking=True)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@lru_cache(maxsize=256)
def _constant(values: tuple, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device)


def constant(values: Sequence[float], device: Union[str, torch.device], dtype: torch.dtype = torch.float32
             ) -> torch.Tensor:
    """A read-only 1-D tensor of ``values`` on ``device``, made once per (values, device, dtype)."""
    return _constant(tuple(float(v) for v in values), str(torch.device(device)), dtype)


def sync_device(device: Union[str, torch.device]) -> None:
    """Block until ``device`` has finished its queued work (CUDA only; a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
