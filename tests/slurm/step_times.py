"""Median MoCo step time of a pretraining run, from its TensorBoard scalars (docs/slurm.md's measurement).

    python tests/slurm/step_times.py RUN_DIR [RUN_DIR ...]

``train/images_per_s`` is logged every ``train.log_every_steps`` steps over that window (data + compute, all
ranks' images); step time = global batch / images_per_s. The first window (start-up) is left out.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def step_time_ms(run: Path) -> tuple:
    batch = yaml.safe_load((run / "config.yaml").read_text())["optim"]["batch_size"]
    acc = EventAccumulator(str(run))
    acc.Reload()
    rates = [e.value for e in acc.Scalars("train/images_per_s")][1:]
    return statistics.median(1000.0 * batch / r for r in rates), len(rates)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        ms, windows = step_time_ms(Path(arg))
        print(f"{arg}: median step {ms:.0f} ms over {windows} windows")
