"""Pretraining input-pipeline throughput, side by side in one run:

  (a) compute ceiling: MoCo training steps on views already on the device
  (b) end to end, GPU path: nvjpeg decode (CPU decode without CUDA) + batched device augmentation + step
  (c) end to end, CPU path: torchvision/PIL augmentation in DataLoader workers + step
plus each loader alone, peak GPU memory and the ratios b/a and b/c.

    python launch/bench_pretrain.py --backbone resnet50 --recipe ours --batch-size 256 --steps 50 --data /coco/train2017
    python launch/bench_pretrain.py --backbone resnet18 --recipe moco batch_size=8 steps=3   # CPU smoke run
Every flag is also a config key (its name with '_'), for key=value and --config YAML; --output-dir writes
results.json and config.yaml there.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from multiprocessing import Pool
from typing import Callable, Iterator, List, Optional

import numpy as np
import torch
from PIL import Image

from selfsup.cli import BACKBONES_HELP, apply_flag_config, entry_parser, parse, run_main, user_errors, write_config
from selfsup.augment import AugmentConfig, PretrainLoader, build_pretrain_loader
from selfsup.device import sync_device
from selfsup.moco.model import MoCo

StepFn = Callable[[List[torch.Tensor]], None]


def _endless(loader: PretrainLoader) -> Iterator[List[torch.Tensor]]:
    """Batches of consecutive epochs, without end."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure_loader(loader: PretrainLoader, steps: int, warmup: int = 2) -> float:
    """Images per second delivered by ``loader`` (views ready on its device), over ``steps`` batches."""
    it = _endless(loader)
    for _ in range(warmup):
        next(it)
    sync_device(loader.device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += next(it)[0].shape[0]
    sync_device(loader.device)
    return images / (time.perf_counter() - start)


def measure_train_step(model_step_fn: StepFn, views: List[torch.Tensor], steps: int, warmup: int = 2) -> float:
    """Images per second of ``model_step_fn(views)`` on fixed device-resident views (compute ceiling)."""
    for _ in range(warmup):
        model_step_fn(views)
    sync_device(views[0].device)
    start = time.perf_counter()
    for _ in range(steps):
        model_step_fn(views)
    sync_device(views[0].device)
    return steps * views[0].shape[0] / (time.perf_counter() - start)


def moco_step_fn(arch: str, recipe: str, batch_size: int, device: torch.device) -> StepFn:
    """One real MoCo training step (the model of ``launch/pretrain.py``): bf16 autocast and
    channels_last on CUDA, fp32 on CPU; kNN positives on for the improved recipe."""
    queue = 65536 if 65536 % batch_size == 0 else batch_size * 16
    model = MoCo(arch=arch, queue_size=queue, knn_k=20 if recipe == "ours" else 0).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as launch/pretrain.py
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    momentum = 0.999 if recipe == "moco" else 0.995

    def step(views: List[torch.Tensor]) -> None:
        if device.type == "cuda":
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out, keys = model(views, momentum=momentum, use_knn=recipe == "ours")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        model.enqueue(*keys)

    return step


def measure_end_to_end(loader: PretrainLoader, step_fn: StepFn, steps: int, warmup: int = 2) -> float:
    """Images per second of training steps fed by ``loader`` (decode + augmentation + step)."""
    it = _endless(loader)
    for _ in range(warmup):
        step_fn(next(it))
    sync_device(loader.device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        views = next(it)
        step_fn(views)
        images += views[0].shape[0]
    sync_device(loader.device)
    return images / (time.perf_counter() - start)


def _write_jpeg(job) -> None:
    root, i, size, seed = job
    rng = np.random.default_rng([seed, i])
    w, h = size if i % 4 else size[::-1]  # a quarter portrait, as in COCO: batches mix two image sizes
    base = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    Image.fromarray(base).resize((w, h), Image.BICUBIC).save(os.path.join(root, f"{i:06d}.jpg"), quality=90)


def make_jpeg_folder(root: str, count: int, size=(640, 480), seed: int = 0, processes: int = 1) -> str:
    """Random-texture JPEGs of COCO-like size (``size`` = (width, height)), written by ``processes`` processes."""
    os.makedirs(root, exist_ok=True)
    jobs = [(root, i, tuple(size), seed) for i in range(count)]
    if processes > 1:
        with Pool(processes) as pool:
            pool.map(_write_jpeg, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_jpeg(job)
    return root


def run(args: argparse.Namespace, step_fn: Optional[StepFn] = None) -> dict:
    device = torch.device(args.device)
    cfg = AugmentConfig.preset(args.recipe, decode="gpu" if device.type == "cuda" else "cpu")
    common = dict(batch_size=args.batch_size, num_workers=args.workers, seed=0, device=device)
    gpu_loader = build_pretrain_loader(args.data, cfg, gpu_aug=True, **common)
    cpu_loader = build_pretrain_loader(args.data, cfg, gpu_aug=False, **common)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_fn = step_fn or moco_step_fn(args.arch, args.recipe, args.batch_size, device)
    views = next(iter(gpu_loader))
    results = {"a_compute_ceiling": measure_train_step(step_fn, views, args.steps)}
    results["b_end_to_end_gpu_aug"] = measure_end_to_end(gpu_loader, step_fn, args.steps)
    results["c_end_to_end_cpu_aug"] = measure_end_to_end(cpu_loader, step_fn, args.steps)
    results["loader_only_gpu_aug"] = measure_loader(gpu_loader, args.steps)
    results["loader_only_cpu_aug"] = measure_loader(cpu_loader, args.steps)
    if device.type == "cuda":
        results["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    results["ratio_b_over_a"] = results["b_end_to_end_gpu_aug"] / results["a_compute_ceiling"]
    results["ratio_b_over_c"] = results["b_end_to_end_gpu_aug"] / results["c_end_to_end_cpu_aug"]
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(__doc__, config_help="YAML of flag values (keys: the flags' names with '_')",
                          output_help="write results.json here (default: print only)",
                          backbone=f"backbone: {BACKBONES_HELP} (default resnet50)",
                          overrides_help="flag values key=value, e.g. batch_size=8 steps=3")
    parser.add_argument("--recipe", default="ours", choices=["moco", "multicrop", "ours"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--data", default=None, help="image folder; default: generated 640x480 JPEGs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=0,
                        help="generated JPEGs when --data is not given (default: batch size x (steps + 3))")
    parser.add_argument("--jpeg-size", default="640x480", help="WIDTHxHEIGHT of the generated JPEGs (COCO-like)")
    parser.add_argument("--output", help="also write the results as JSON here")
    parser.add_argument("--generate", metavar="DIR", help="only write the generated JPEGs into DIR, then exit")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parse(parser, argv)
    with user_errors(args.debug):
        cfg = apply_flag_config(parser, args, "BenchPretrainConfig")
        args.arch = args.backbone or "resnet50"
        _main(args, cfg)


def _main(args: argparse.Namespace, cfg: object) -> None:
    size = tuple(int(v) for v in args.jpeg_size.lower().split("x"))
    count = args.images or args.batch_size * (args.steps + 3)
    if args.generate:
        make_jpeg_folder(args.generate, count=count, size=size, processes=max(1, args.workers))
        print(f"wrote {count} JPEGs of {args.jpeg_size} to {args.generate}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            args.data = make_jpeg_folder(tmp, count=count, size=size, processes=max(1, args.workers))
        results = run(args)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"{args.arch} recipe={args.recipe} batch={args.batch_size} device={device}")
    for name, value in results.items():
        unit = "GiB" if name.endswith("gib") else ("x" if name.startswith("ratio") else "img/s")
        print(f"  {name:22s} {value:10.1f} {unit}")
    if args.output_dir:
        write_config(cfg, args.output_dir, entry="launch/bench_pretrain.py")
    outputs = ([args.output] if args.output else []) + ([os.path.join(args.output_dir, "results.json")]
                                                         if args.output_dir else [])
    for path in outputs:
        with open(path, "w") as f:
            json.dump({"args": vars(args), "device": device, "results": results}, f, indent=2)


if __name__ == "__main__":
    run_main(main)
