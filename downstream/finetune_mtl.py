#!/usr/bin/env python
"""Multi-task dense prediction finetuning: single-task baselines, MTL baseline, PAD-Net, MTI-Net.

Examples:
  python downstream/finetune_mtl.py --weights moco.pth                       # MTI-Net on embedded NYUD-format data
  python downstream/finetune_mtl.py --config configs/nyud/single_task_semseg.yaml --single-task-results runs/nyud_st.json
  python downstream/finetune_mtl.py --config configs/nyud/mti_net.yaml --single-task-results runs/nyud_st.json \\
      --weights checkpoint.pth data.root=/data/NYUD_MT                         # Δ_MTL against the single-task runs
  python downstream/finetune_mtl.py --config configs/pascal/mti_net.yaml --weights none --slurm --gpus-per-node 1
  python downstream/finetune_mtl.py --config configs/nyud/mtl_baseline.yaml --balancer gradnorm 'optim.balancer_args={alpha: 1.5}'
Any config key can be set as key=value (see downstream/mtl/config.py).
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

from selfsup.cli import BACKBONES_HELP, WEIGHTS_HELP, entry_parser, launch, parse, run_main, user_errors
from selfsup.config import load_config, nested_updates

from downstream.mtl.balancers import balancer_names
from downstream.mtl.config import MTLConfig
from downstream.mtl.train import run_finetune


def build_parser() -> argparse.ArgumentParser:
    p = entry_parser(__doc__, config_help="YAML with the differences from the defaults (configs/nyud/*.yaml, "
                     "configs/pascal/*.yaml)",
                     output_help="run directory (config, checkpoints, TensorBoard, results); runs resume from it "
                                 "(default: output_dir of the config, runs/mtl)",
                     weights=WEIGHTS_HELP + " (model.weights)", backbone=f"encoder backbone: {BACKBONES_HELP}",
                     launch=True, overrides_help="config overrides key=value, e.g. optim.lr=1e-4 model.backbone=resnet50")
    p.add_argument("--single-task-results", help="JSON of single-task metrics: single-task runs add to it, MTL runs report Δ_MTL")
    p.add_argument("--data-root", help="dataset folder in its on-disk layout, or 'embedded' (default)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even when the config differs from the checkpoint's in keys that change the run "
                        "(without it such a resume is an error listing the keys; see docs/reliability.md)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--balancer", help=f"loss balancer of the main tasks (optim.balancer; parameters: optim.balancer_args="
                                      f"{{alpha: 1.5}}): {', '.join(balancer_names())}; default fixed")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return parse(build_parser(), argv)  # key=value overrides anywhere, also after flags


def flag_updates(args: argparse.Namespace) -> Dict[str, Any]:
    return nested_updates({"model.weights": args.weights, "model.backbone": args.backbone,
                           "eval.single_task_results": args.single_task_results,
                           "data.root": args.data_root, "output_dir": args.output_dir, "epochs": args.epochs,
                           "data.batch_size": args.batch_size, "optim.lr": args.lr,
                           "allow_config_change": args.allow_config_change or None,
                           "optim.balancer": args.balancer})


def main(argv: Optional[List[str]] = None) -> Any:
    args = parse_args(argv)

    def make_cfg(extra: List[str]) -> MTLConfig:
        return load_config(MTLConfig, yaml_path=args.config, updates=flag_updates(args),
                           overrides=list(args.overrides) + list(extra))

    with user_errors(args.debug):
        return launch(run_finetune, make_cfg, args)


if __name__ == "__main__":
    run_main(main)
