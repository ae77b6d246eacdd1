"""Pretraining input-pipeline throughput, side by side in one run:

  (a) compute ceiling: a training step on views already on the device (``measure_train_step``)
  (b) end-to-end GPU path: nvjpeg decode (CPU decode without CUDA) + batched device augmentation
  (c) CPU path: torchvision/PIL augmentation in DataLoader workers

    python launch/bench_pretrain.py --arch resnet50 --recipe ours --batch-size 256 --steps 50 --data /coco/train2017
    python launch/bench_pretrain.py --arch resnet18 --recipe moco --batch-size 8 --steps 3   # CPU smoke run
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Callable, Iterable, List, Optional

import numpy as np
import torch
import torchvision
from PIL import Image

from selfsup.augment import AugmentConfig, PretrainLoader, build_pretrain_loader

StepFn = Callable[[List[torch.Tensor]], None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_loader(loader: PretrainLoader, steps: int, warmup: int = 2) -> float:
    """Images per second delivered by ``loader`` (views ready on its device), over ``steps`` batches."""
    def batches() -> Iterable[List[torch.Tensor]]:
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = batches()
    for _ in range(warmup):
        next(it)
    _sync(loader.device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += next(it)[0].shape[0]
    _sync(loader.device)
    return images / (time.perf_counter() - start)


def measure_train_step(model_step_fn: StepFn, views: List[torch.Tensor], steps: int, warmup: int = 2) -> float:
    """Images per second of ``model_step_fn(views)`` on fixed device-resident views (compute ceiling)."""
    for _ in range(warmup):
        model_step_fn(views)
    _sync(views[0].device)
    start = time.perf_counter()
    for _ in range(steps):
        model_step_fn(views)
    _sync(views[0].device)
    return steps * views[0].shape[0] / (time.perf_counter() - start)


def backbone_step_fn(arch: str, device: torch.device) -> StepFn:
    """A stand-in training step: forward + backward + SGD of a torchvision backbone on every view."""
    model = getattr(torchvision.models, arch)(num_classes=128).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)

    def step(views: List[torch.Tensor]) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = sum(model(v.contiguous(memory_format=torch.channels_last)).float().pow(2).mean() for v in views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def make_jpeg_folder(root: str, count: int, size=(640, 480), seed: int = 0) -> str:
    """Random-texture JPEGs of COCO-like size."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        base = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        Image.fromarray(base).resize(size, Image.BICUBIC).save(os.path.join(root, f"{i:06d}.jpg"), quality=90)
    return root


def run(args: argparse.Namespace, step_fn: Optional[StepFn] = None) -> dict:
    device = torch.device(args.device)
    cfg = AugmentConfig.preset(args.recipe, decode="gpu" if device.type == "cuda" else "cpu")
    common = dict(batch_size=args.batch_size, num_workers=args.workers, seed=0, device=device)
    gpu_loader = build_pretrain_loader(args.data, cfg, gpu_aug=True, **common)
    cpu_loader = build_pretrain_loader(args.data, cfg, gpu_aug=False, **common)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = {"gpu_decode_gpu_aug": measure_loader(gpu_loader, args.steps)}
    if device.type == "cuda":
        results["gpu_aug_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    results["cpu_torchvision"] = measure_loader(cpu_loader, args.steps)
    step_fn = step_fn or backbone_step_fn(args.arch, device)
    views = next(iter(gpu_loader))
    results["compute_ceiling"] = measure_train_step(step_fn, views, args.steps)
    if device.type == "cuda":
        results["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--recipe", default="ours", choices=["moco", "multicrop", "ours"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--data", default=None, help="image folder; default: generated 640x480 JPEGs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            args.data = make_jpeg_folder(tmp, count=args.batch_size * (args.steps + 3))
        results = run(args)
    print(f"{args.arch} recipe={args.recipe} batch={args.batch_size} device={args.device}")
    for name, value in results.items():
        unit = "GiB" if name.endswith("gib") else "img/s"
        print(f"  {name:22s} {value:10.1f} {unit}")


if __name__ == "__main__":
    main()
