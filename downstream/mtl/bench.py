"""Training-throughput benchmark of the multi-task architectures (synthetic batches already on the device).

Each (architecture, precision mode) pair trains ``steps`` timed Adam steps after ``warmup`` untimed ones;
reported: images/s and the peak accelerator memory of that pair (CUDA ``max_memory_allocated``; on CPU the
process's peak RSS, which only grows, is given instead).
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from selfsup.device import sync_device

from .losses import MultiTaskLoss
from .models import build_model
from .tasks import TASKS, TaskSet, loss_weights


@dataclass(frozen=True)
class Mode:
    name: str
    bf16: bool
    channels_last: bool
    compile: bool = False


MODES = {"fp32": Mode("fp32", False, False), "bf16_cl": Mode("bf16+channels_last", True, True),
         "bf16_cl_compile": Mode("bf16+channels_last+compile", True, True, True)}


def synthetic_batch(tasks: TaskSet, batch_size: int, size, device: torch.device, *, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    H, W = size
    targets = {}
    for t in tasks.all:
        kind = TASKS[t].kind
        if kind == "classes":
            targets[t] = torch.randint(0, tasks.num_outputs(t), (batch_size, H, W), generator=g)
        elif kind == "normals":
            targets[t] = torch.nn.functional.normalize(torch.randn(batch_size, 3, H, W, generator=g), dim=1)
        elif kind == "depth":
            targets[t] = torch.rand(batch_size, 1, H, W, generator=g) * 10
        else:
            targets[t] = (torch.rand(batch_size, 1, H, W, generator=g) > 0.9).float()
    images = torch.randn(batch_size, 3, H, W, generator=g)
    return images.to(device), {t: v.to(device) for t, v in targets.items()}


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def benchmark(arch: str, mode: Mode, *, tasks: TaskSet, backbone: str, size, batch_size: int, steps: int, warmup: int,
              device: torch.device, model_kwargs: Optional[Dict] = None) -> Dict[str, object]:
    """Images/s and peak memory of ``steps`` training steps of one architecture in one precision mode."""
    torch.manual_seed(0)
    model = build_model(arch, tasks=tasks, backbone=backbone, **(model_kwargs or {})).to(device)
    images, targets = synthetic_batch(tasks, batch_size, size, device)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if mode.compile else model
    criterion = MultiTaskLoss(loss_weights(tasks.dataset, tasks.all))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mode.bf16 else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with autocast:
            outputs = forward(images)
        loss, _ = criterion(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    sync_device(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync_device(device)
    elapsed = time.perf_counter() - start
    result = {"arch": arch, "mode": mode.name, "img_per_s": batch_size * steps / elapsed,
              "step_ms": 1000 * elapsed / steps, "peak_memory_mib": _peak_memory_mib(device)}
    del model, forward, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_benchmarks(archs: Sequence[str], modes: Sequence[str], **kwargs) -> List[Dict[str, object]]:
    return [benchmark(arch, MODES[m], **kwargs) for arch in archs for m in modes]


def format_table(results: Sequence[Dict[str, object]], *, memory_label: str) -> str:
    """Markdown table: one row per architecture, one img/s + memory column pair per mode."""
    modes = list(dict.fromkeys(r["mode"] for r in results))
    header = "| arch | " + " | ".join(f"{m} img/s | {m} {memory_label} (MiB)" for m in modes) + " |"
    lines = [header, "|---" * (1 + 2 * len(modes)) + "|"]
    for arch in dict.fromkeys(r["arch"] for r in results):
        row = {r["mode"]: r for r in results if r["arch"] == arch}
        cells = " | ".join(f"{row[m]['img_per_s']:.1f} | {row[m]['peak_memory_mib']:.0f}" for m in modes)
        lines.append(f"| {arch} | {cells} |")
    return "\n".join(lines)


def architecture_costs(archs: Sequence[str], *, tasks: TaskSet, backbone: str, size,
                       model_kwargs: Optional[Dict] = None) -> Dict[str, Dict[str, int]]:
    """Params/FLOPs (meta device, no compute) of each architecture and of one single-task model per main task."""
    from .flops import model_cost

    kw = dict(model_kwargs or {})
    costs = {f"single_task[{t}]": model_cost(lambda t=t: build_model("single_task", tasks=TaskSet(tasks.dataset, (t,)),
                                                                     backbone=backbone, **kw), size) for t in tasks.main}
    for arch in archs:
        costs[arch] = model_cost(lambda arch=arch: build_model(arch, tasks=tasks, backbone=backbone, **kw), size)
    return costs
