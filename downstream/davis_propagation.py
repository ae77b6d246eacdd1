#!/usr/bin/env python
"""DAVIS-2017 semi-supervised video object segmentation by label propagation on frozen features.

No finetuning: stride-8 features of the frozen backbone (ResNet: dilated layer3, layer4 not run), L2-normalised;
each frame takes the labels of its top-k (k=10) most similar positions among the first frame (ground truth) and
the previous 20 predicted frames (radius 12 cells), weighted by softmax(similarity / 0.05). Writes palette PNGs
in the DAVIS results layout (<output-dir>/<sequence>/<frame>.png, readable by the official evaluation), one
picture per sequence (<output-dir>/overlays/), and evaluates them with the official J&F definitions:
global_results-<split>.csv, per-sequence_results-<split>.csv and results.json (all in percent, frames/s).

  python downstream/davis_propagation.py --weights runs/x/checkpoint.pth --backbone resnet50 \\
      --data-root /data/DAVIS --output-dir runs/x/davis                     # real DAVIS-2017 val
  python downstream/davis_propagation.py --weights none --backbone resnet_small   # embedded data, random init
  python downstream/davis_propagation.py --eval-only runs/x/davis --data-root /data/DAVIS   # any predictions
  python downstream/davis_propagation.py --weights W propagation.topk=5 --sweep propagation.temperature=0.03,0.07
  python downstream/davis_propagation.py --weights W --backbone resnet50 --slurm --gpus-per-node 1
Config keys (key=value, or YAML with --config): output_dir, eval_only, pictures, model.backbone, model.weights,
data.root, data.split, propagation.context, .temperature, .topk, .radius, .frames_per_chunk, .queries_per_chunk.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from selfsup.cli import (BACKBONES_HELP, WEIGHTS_HELP, BackboneConfig, entry_parser, launch, parse, run_main,
                         user_errors, write_config)
from selfsup.config import load_config, nested_updates
from frozen.davis import DAVIS2017
from frozen.davis_metrics import score_davis
from frozen.features import dense_extractor
from frozen.propagation import PropagationConfig, run_propagation

ENTRY = "downstream/davis_propagation.py"


@dataclass
class DavisDataConfig:
    root: str = "embedded"  # DAVIS-2017 root (JPEGImages/480p, Annotations/480p, ImageSets/2017), or 'embedded'
    split: str = "val"  # ImageSets/2017/<split>.txt


@dataclass
class DavisConfig:
    output_dir: str = ""  # default runs/davis/<model.backbone>
    eval_only: bool = False  # only evaluate the DAVIS-layout predictions in output_dir (no backbone)
    pictures: bool = True  # one picture per sequence in <output_dir>/overlays
    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: DavisDataConfig = field(default_factory=DavisDataConfig)
    propagation: PropagationConfig = field(default_factory=PropagationConfig)


def build_parser() -> argparse.ArgumentParser:
    p = entry_parser(__doc__, config_help="YAML with the differences from the defaults (keys below)",
                     output_help="predictions, pictures and results (default: runs/davis/<backbone>)",
                     weights=WEIGHTS_HELP + " (model.weights)", backbone=f"backbone: {BACKBONES_HELP}; must match "
                     "the weights (default resnet50)", launch=True)
    p.add_argument("--eval-only", metavar="RESULTS_DIR",
                   help="only evaluate the DAVIS-layout predictions in RESULTS_DIR (writes the CSVs there); "
                        "= --output-dir RESULTS_DIR eval_only=true")
    p.add_argument("--data-root", help="DAVIS-2017 root holding JPEGImages/480p, Annotations/480p, ImageSets/2017 "
                                       "(data.root; default: the embedded data)")
    p.add_argument("--split", help="ImageSets/2017/<split>.txt (data.split; default val)")
    p.add_argument("--context", type=int, help="previous predicted frames as context (propagation.context)")
    p.add_argument("--temperature", type=float, help="softmax temperature tau (propagation.temperature)")
    p.add_argument("--topk", type=int, help="context positions kept per query (propagation.topk)")
    p.add_argument("--radius", type=int, help="window (cells) in the recent frames (propagation.radius)")
    p.add_argument("--no-pictures", action="store_true", help="skip the per-sequence pictures (pictures=false)")
    return p


def flag_updates(args: argparse.Namespace) -> Dict[str, Any]:
    return nested_updates({
        "output_dir": args.eval_only or args.output_dir, "eval_only": True if args.eval_only else None,
        "pictures": False if args.no_pictures else None, "model.backbone": args.backbone,
        "model.weights": args.weights, "data.root": args.data_root, "data.split": args.split,
        "propagation.context": args.context, "propagation.temperature": args.temperature,
        "propagation.topk": args.topk, "propagation.radius": args.radius})


def make_config(args: argparse.Namespace, extra: List[str] = ()) -> DavisConfig:
    cfg = load_config(DavisConfig, yaml_path=args.config, updates=flag_updates(args),
                      overrides=list(args.overrides) + list(extra))
    if not cfg.eval_only:
        cfg.model.require_weights(" or --eval-only RESULTS_DIR")
    if not cfg.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=f"runs/davis/{cfg.model.backbone}")
    return cfg


def run_davis(cfg: DavisConfig) -> Dict[str, Any]:
    """Propagate (unless eval_only) and evaluate; results.json, the CSVs and config.yaml in cfg.output_dir."""
    logging.basicConfig(level=logging.INFO)
    dataset = DAVIS2017(cfg.data.root, split=cfg.data.split)
    out = Path(cfg.output_dir)
    speed: Dict[str, Any] = {}
    if not cfg.eval_only:
        extractor = dense_extractor(cfg.model.backbone, cfg.model.weights)
        write_config(cfg, out, entry=ENTRY)
        speed = run_propagation(extractor, dataset, out, cfg=cfg.propagation, pictures=cfg.pictures)
        print(f"propagated {speed['frames']} frames at {speed['frames_per_s']:.1f} frames/s")
    else:
        write_config(cfg, out, entry=ENTRY)
    result = {**score_davis(out, dataset, propagated=not cfg.eval_only), **speed, "sequences": len(dataset),
              "split": cfg.data.split}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def main(argv: Optional[List[str]] = None) -> Any:
    args = parse(build_parser(), argv)
    with user_errors(args.debug):
        return launch(run_davis, lambda extra: make_config(args, extra), args, processes=False)


if __name__ == "__main__":
    run_main(main)
