"""Toy training functions run by tests/test_launcher.py and tests/test_slurm.py (locally and inside SLURM jobs).

Imported as the top-level module ``toy_jobs`` (tests put tests/slurm on sys.path); the launcher exports that
folder on the job's PYTHONPATH so submitit can unpickle these functions by reference.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from selfsup import distributed
from selfsup.checkpoint import last_checkpoint, load_checkpoint, save_checkpoint
from selfsup.config import load_config
from selfsup.logs import ScalarWriter


@dataclass
class ToyConfig:
    output_dir: str = "toy_run"
    steps: int = 3
    sleep_s: float = 0.0
    lr: float = 0.1
    seed: int = 0


def make_cfg(output_dir: str, overrides=()):
    """A ``make_cfg(extra_overrides)`` for :func:`selfsup.launcher.launch`."""
    return lambda extra: load_config(ToyConfig, overrides=[f"output_dir={output_dir}", *overrides, *extra])


def report_ranks(cfg: ToyConfig) -> dict:
    """Every rank writes what it sees (rank, world size, an all_gather of the ranks) to rank<r>.json."""
    env = distributed.init_distributed(device_type="cpu")
    try:
        gathered = distributed.all_gather(torch.tensor([distributed.get_rank()]))
        info = {"rank": distributed.get_rank(), "world_size": distributed.get_world_size(),
                "env_rank": env.rank, "local_rank": env.local_rank, "gathered": gathered.tolist(),
                "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
                "lr": cfg.lr}
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{info['rank']}.json").write_text(json.dumps(info))
        distributed.barrier()
        return info
    finally:
        distributed.cleanup()


def _step(weights: torch.Tensor, generator: torch.Generator, lr: float) -> torch.Tensor:
    # a fake SGD step whose "gradient" comes from the seeded generator: resuming must restore its state too
    grad = torch.randn(weights.shape, generator=generator) + weights
    return weights - lr * grad


def train_loop(cfg: ToyConfig) -> dict:
    """A tiny resumable training run: checkpoint every step to output_dir, resume from it automatically."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train_log.txt", "a")
    generator = torch.Generator().manual_seed(cfg.seed)
    weights, start = torch.zeros(4), 0
    ckpt_path = last_checkpoint(out)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        weights, start = ckpt["weights"], ckpt["step"]
        generator.set_state(ckpt["generator"])
        print(f"resumed from step {start}", file=log, flush=True)
        print(f"resumed from step {start}", flush=True)
    else:
        print("started from scratch", file=log, flush=True)
    writer = ScalarWriter(out)
    for step in range(start, cfg.steps):
        weights = _step(weights, generator, cfg.lr)
        save_checkpoint({"step": step + 1, "weights": weights, "generator": generator.get_state()},
                        out / "checkpoint.pth")
        writer.scalars({"loss": float(weights.pow(2).sum())}, step)
        writer.flush()
        print(f"step {step + 1}/{cfg.steps} done", file=log, flush=True)
        time.sleep(cfg.sleep_s)
    writer.close()
    final = {"step": cfg.steps, "weights": weights.tolist()}
    (out / "final.json").write_text(json.dumps(final))
    log.close()
    return final
