#!/usr/bin/env python
"""DAVIS-2017 semi-supervised video object segmentation by label propagation on frozen features.

No finetuning: stride-8 features of the frozen backbone (ResNet: dilated layer3, layer4 not run), L2-normalised;
each frame takes the labels of its top-k (k=10) most similar positions among the first frame (ground truth) and
the previous 20 predicted frames (radius 12 cells), weighted by softmax(similarity / 0.05). Writes palette PNGs
in the DAVIS results layout (<output-dir>/<sequence>/<frame>.png, readable by the official evaluation), one
picture per sequence (<output-dir>/overlays/), and evaluates them with the official J&F definitions:
global_results-<split>.csv, per-sequence_results-<split>.csv and results.json (all in percent, frames/s).

  python downstream/davis_propagation.py --weights runs/x/checkpoint.pth --arch resnet50 \\
      --data-root /data/DAVIS --output-dir runs/x/davis                     # real DAVIS-2017 val
  python downstream/davis_propagation.py --weights none --arch resnet_small   # embedded data, random init
  python downstream/davis_propagation.py --eval-only runs/x/davis --data-root /data/DAVIS   # any predictions
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import List, Optional

from selfsup.data import DAVIS2017
from selfsup.launcher import user_errors
from downstream.evaluation.davis_metrics import score_davis
from downstream.evaluation.features import add_common_args, dense_extractor
from downstream.evaluation.propagation import PropagationConfig, run_propagation

defaults = PropagationConfig()


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval-only", metavar="RESULTS_DIR",
                   help="only evaluate the DAVIS-layout predictions in RESULTS_DIR (writes the CSVs there)")
    add_common_args(p, data_help="DAVIS-2017 root holding JPEGImages/480p, Annotations/480p, ImageSets/2017",
                    output_help="predictions, pictures and results (default: runs/davis_<arch>)", weights_required=False)
    p.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt (default val)")
    p.add_argument("--context", type=int, default=defaults.context, help="previous predicted frames as context")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="softmax temperature tau")
    p.add_argument("--topk", type=int, default=defaults.topk, help="context positions kept per query")
    p.add_argument("--radius", type=int, default=defaults.radius, help="window (cells) in the recent frames")
    p.add_argument("--no-pictures", action="store_true", help="skip the per-sequence pictures")
    args = p.parse_args(argv)
    if args.eval_only is None and args.weights is None:
        p.error("--weights is required (or --eval-only RESULTS_DIR)")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    with user_errors():  # bad data, checkpoints, paths: one line, no traceback
        run(args)


def run(args: argparse.Namespace) -> dict:
    dataset = DAVIS2017(args.data_root, split=args.split)
    out = Path(args.eval_only or args.output_dir or f"runs/davis_{args.arch}")
    speed = {}
    if args.eval_only is None:
        cfg = PropagationConfig(context=args.context, temperature=args.temperature, topk=args.topk, radius=args.radius)
        speed = run_propagation(dense_extractor(args.arch, args.weights), dataset, out, cfg=cfg,
                                pictures=not args.no_pictures)
        print(f"propagated {speed['frames']} frames at {speed['frames_per_s']:.1f} frames/s")
    result = {**score_davis(out, dataset, propagated=args.eval_only is None), **speed, "sequences": len(dataset),
              "split": args.split}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
