#!/usr/bin/env python
"""MoCo-v2 pretraining (and the improved recipe): local, multi-process or on SLURM.

Examples:
  python launch/pretrain.py                                  # embedded scenes, configs/pretrain/demo.yaml
  python launch/pretrain.py --data coco --multicrop --knn 20 # the improved recipe on COCO
  python launch/pretrain.py --backbone resnet18 --output-dir runs/r18   # = model.backbone=resnet18 output_dir=runs/r18
  python launch/pretrain.py --config configs/pretrain/ours_coco_200ep.yaml --slurm --nodes 2 --gpus-per-node 8
  python launch/pretrain.py optim.lr=0.03 train.epochs=800   # any config key as key=value
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

from selfsup.cli import BACKBONES_HELP, entry_parser, launch, parse, run_main, user_errors
from selfsup.config import load_config
from selfsup.moco.config import PretrainConfig, flags_to_updates
from frozen.pretrain_monitors import pretrain  # registers the kNN / DAVIS / retrieval monitors

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = entry_parser(__doc__, config_help="YAML file with the differences from the defaults (configs/pretrain/*.yaml); "
                     "without --config and --data: configs/pretrain/demo.yaml",
                     output_help="run directory: config, checkpoints, TensorBoard; runs resume from it "
                                 "(default: output_dir of the config, runs/pretrain)",
                     backbone=f"backbone: {BACKBONES_HELP}", launch=True,
                     overrides_help="config overrides key=value, e.g. optim.lr=0.3 (anywhere on the command line)")
    p.add_argument("--data", help="dataset name (coco, embedded, ...) or a folder of images")
    p.add_argument("--data-root", help="root folder of --data (else $SCENESSL_<NAME>_ROOT)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size (default 256)")
    p.add_argument("--lr", type=float, help="learning rate for a global batch of 256 (default 0.3)")
    p.add_argument("--workers", type=int, help="data loader workers per process")
    p.add_argument("--seed", type=int)
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even when the config differs from the checkpoint's in keys that change the run "
                        "(without it such a resume is an error listing the keys; see docs/reliability.md)")
    g = p.add_argument_group("improved recipe")
    g.add_argument("--multicrop", action="store_true", help="2x160 + N x 96 constrained multi-crop, m=0.995")
    g.add_argument("--num-small", type=int, default=4, help="small crops with --multicrop (default 4)")
    g.add_argument("--crop-constraint", choices=["overlap", "inside", "none"], help="small-crop rule (default overlap)")
    g.add_argument("--auto-augment", action=argparse.BooleanOptionalAction, default=None,
                   help="Standard-or-AutoAugment on query and small crops (default on with --multicrop)")
    g.add_argument("--knn", type=int, nargs="?", const=20, help="kNN positives with top-K neighbours (default K=20)")
    g.add_argument("--knn-weight", type=float, help="λ of the kNN loss (default 0.4)")
    g.add_argument("--knn-warmup-epochs", type=int, help="epochs without the kNN loss (default: 5 for runs up to 200 epochs, 20 for longer)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return parse(build_parser(), argv)  # key=value overrides anywhere, also after flags


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    # no --config and no --data: the small CPU-friendly run on the embedded scenes
    config = args.config or (DEMO_CONFIG if args.data is None else None)

    def make_cfg(extra: List[str]) -> PretrainConfig:
        return load_config(PretrainConfig, yaml_path=config, updates=flags_to_updates(args),
                           overrides=list(args.overrides) + list(extra))

    with user_errors(args.debug):
        launch(pretrain, make_cfg, args)


if __name__ == "__main__":
    run_main(main)
