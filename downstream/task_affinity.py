#!/usr/bin/env python
"""Task affinities at the candidate branch points of the shared encoder (branched multi-task networks, step 1).

Trains one single-task network per task (or loads finished runs from --single-task-runs), then measures, at each
branch point (default: after each ResNet stage), how alike the tasks are on K held-out validation images:
  rsa       RDM per task (1 - Pearson between the images' features), Spearman between the RDMs (thesis)
  transfer  task a's frozen bottom under task t's retrained top; tournament matrices of per-sample losses,
            principal eigenvectors P, A = (P + P^T)/2 (branched-networks paper)
Writes OUTPUT/affinity.npz (affinity [D,N,N], tasks, branch_points, method, num_images, config) and one heat-map
per branch point (OUTPUT/affinity_<method>_stage<d>.png). Then: python downstream/branch.py --affinity ...

Examples:
  python downstream/task_affinity.py --config configs/pascal/mtl_baseline.yaml --weights W --output-dir runs/aff
  python downstream/task_affinity.py --config configs/pascal/mtl_baseline.yaml --method transfer \\
      --single-task-runs runs/aff/single_task --output-dir runs/aff_transfer --transfer-steps 100
Any config key can be set as key=value (see downstream/mtl/config.py); the tasks are data.tasks.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional

from selfsup.cli import (BACKBONES_HELP, WEIGHTS_HELP, entry_parser, launch, parse, run_main, user_errors,
                         write_config)
from selfsup.config import load_config, nested_updates
from selfsup.logs import setup_logging

from downstream.mtl.affinity_runs import METHODS, compute_task_affinity
from downstream.mtl.branch_plan import save_affinity
from downstream.mtl.config import MTLConfig
from downstream.mtl.data import resolve_crop_size
from downstream.mtl.tree_plot import affinity_heatmap

DEFAULT_OUTPUT = "runs/affinity"


def build_parser() -> argparse.ArgumentParser:
    p = entry_parser(__doc__, config_help="MTL YAML (configs/<dataset>/*.yaml): tasks, backbone, heads, training recipe",
                     output_help="affinity.npz and heat-maps go here (default: runs/affinity)",
                     weights=WEIGHTS_HELP + " (model.weights of the single-task networks)",
                     backbone=f"encoder backbone: {BACKBONES_HELP}", launch=True,
                     overrides_help="config overrides key=value, e.g. model.backbone=resnet50 epochs=20")
    p.add_argument("--method", default="rsa", choices=METHODS, help="affinity measure (default: rsa)")
    p.add_argument("--single-task-runs", help="folder with <task>/ finished single-task runs to load; tasks missing "
                                              "there are trained into it (default: OUTPUT/single_task)")
    p.add_argument("--single-task-results", help="JSON the single-task runs add their metrics to (Δ_MTL reference)")
    p.add_argument("--data-root", help="dataset folder in its on-disk layout, or 'embedded' (default)")
    p.add_argument("--max-train-images", type=int, help="train the single-task networks on this many images (subset)")
    p.add_argument("--epochs", type=int, help="epochs of the single-task runs")
    p.add_argument("--num-images", type=int, default=500, help="K held-out (validation) images (fewer if the split is smaller)")
    p.add_argument("--branch-points", type=int, nargs="+", help="backbone stages ending a segment (default 1 2 3 4)")
    p.add_argument("--transfer-steps", type=int, default=50, help="transfer: retraining steps per (task, encoder, depth)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return parse(build_parser(), argv)


def flag_updates(args: argparse.Namespace) -> Dict[str, Any]:
    return nested_updates({"model.weights": args.weights, "model.backbone": args.backbone, "data.root": args.data_root,
                           "epochs": args.epochs, "data.max_train_images": args.max_train_images,
                           "model.branch_points": args.branch_points})


@dataclasses.dataclass
class AffinityJob:
    """One affinity measurement: the MTL config of the single-task networks and the measurement's settings."""
    output_dir: str
    cfg: MTLConfig
    method: str = "rsa"
    single_task_runs: Optional[str] = None
    single_task_results: Optional[str] = None
    num_images: int = 500
    transfer_steps: int = 50


def run_affinity(job: AffinityJob) -> Dict[str, object]:
    """Measure, save affinity.npz and the heat-maps (locally or in a SLURM job)."""
    out = Path(job.output_dir)
    cfg = dataclasses.replace(job.cfg, output_dir=str(out))
    write_config(cfg, out, entry="downstream/task_affinity.py")  # the single-task networks' config (the measurement's settings are in affinity.npz)
    setup_logging(out)
    runs = Path(job.single_task_runs) if job.single_task_runs else out / "single_task"
    result = compute_task_affinity(cfg, method=job.method, runs_dir=runs, num_images=job.num_images,
                                   transfer_steps=job.transfer_steps, single_task_results=job.single_task_results,
                                   progress=cfg.progress)
    save_affinity(out / "affinity.npz", result, cfg)
    for d, point in enumerate(result["branch_points"]):
        affinity_heatmap(result["affinity"][d], result["tasks"], out / f"affinity_{job.method}_stage{point}.png",
                         title=f"{job.method} affinity after stage {point} (K={result['num_images']})")
    print(f"wrote {out / 'affinity.npz'} ({job.method}, tasks {result['tasks']}, stages {result['branch_points']}, "
          f"K={result['num_images']})")
    return result


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)

    def make_job(extra: List[str]) -> AffinityJob:
        cfg = load_config(MTLConfig, yaml_path=args.config, updates=flag_updates(args),
                          overrides=list(args.overrides) + list(extra))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, auxiliary_tasks=[],
                                                                crop_size=resolve_crop_size(cfg.data)))
        return AffinityJob(args.output_dir or DEFAULT_OUTPUT, cfg, method=args.method, single_task_runs=args.single_task_runs,
                           single_task_results=args.single_task_results, num_images=args.num_images,
                           transfer_steps=args.transfer_steps)

    with user_errors(args.debug):
        return launch(run_affinity, make_job, args, processes=False)


if __name__ == "__main__":
    run_main(main)
