#!/usr/bin/env python
"""Frozen-feature probes of a pretrained backbone on pooled, L2-normalised features (no finetuning).

Protocols (--protocol, comma-separated; default knn,linear):
  knn     cosine top-20 kNN classifier, votes weighted exp(sim/0.07), on class folders (top-1 %)
  linear  linear layer, SGD lr 30, momentum 0.9, no weight decay, 100 epochs, lr x0.1 at 60%/80% (top-1 %)
  svm     VOC07: one LinearSVC per class (C=0.5, class weights {1: 2, -1: 1}), difficult = negative (mAP %),
          on ImageSets/Main/<class>_{trainval,test}.txt

  python downstream/linear_probe.py --weights runs/demo/checkpoint.pth --arch resnet_small   # embedded data
  python downstream/linear_probe.py --weights none --arch resnet18          # random-init reference
  python downstream/linear_probe.py --protocol svm --weights W --arch resnet50 --data-root /data/VOCdevkit/VOC2007 \\
      --size 224 --resize 256 --dump-features voc07_feats.pt --out svm.json
  python downstream/linear_probe.py --protocol svm --load-features voc07_feats.pt --svm-cost 1.0 --out svm_c1.json
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import List, Optional

from frozen.features import add_common_args
from downstream.evaluation.protocols import (PROBE_KIND, extract_probe_features, load_features, parse_protocols,
                                             run_probes, save_features)

from selfsup.launcher import user_errors

def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, data_help="dataset root: class folders {train,val}/<class>/ (knn, linear) or a VOC2007 "
                                 "root (svm)", output_help="write results.json here", weights_required=False)
    p.add_argument("--root", dest="data_root", help=argparse.SUPPRESS)  # the former spelling of --data-root
    p.add_argument("--protocol", default="knn,linear", help="comma-separated: knn, linear, svm (default knn,linear)")
    p.add_argument("--data", default=None, help="dataset name of knn/linear (default: classification folders)")
    p.add_argument("--size", type=int, default=64, help="centre-crop size (default 64 for the embedded data; 224 "
                                                        "for real images)")
    p.add_argument("--resize", type=int, default=None, help="resize the shorter side to this before the crop "
                                                            "(default: --size; 256 with --size 224)")
    p.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    p.add_argument("--svm-cost", type=float, default=0.5, help="LinearSVC C (default 0.5)")
    p.add_argument("--dump-features", metavar="FILE", help="save the extracted features to FILE")
    p.add_argument("--load-features", metavar="FILE", help="reuse features saved by --dump-features (no backbone)")
    p.add_argument("--out", help="write the results JSON to this file")
    args = p.parse_args(argv)
    if args.weights is None and args.load_features is None:
        p.error("--weights is required (or --load-features FILE)")
    args.protocols = parse_protocols(args.protocol)
    kinds = {PROBE_KIND[name] for name in args.protocols}
    if len(kinds) > 1 and args.data_root != "embedded":
        p.error("svm reads a VOC07 root and knn/linear class folders: run them separately with --data-root")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    with user_errors():
        if args.load_features:
            features = load_features(args.load_features)
        else:
            features = extract_probe_features(args.protocols, arch=args.arch, weights=args.weights,
                                              root=args.data_root, data=args.data, size=args.size, resize=args.resize)
        if args.dump_features:
            save_features(args.dump_features, features, arch=args.arch, weights=str(args.weights))
        result = run_probes(args.protocols, features, epochs=args.epochs, svm_cost=args.svm_cost)
    print(json.dumps(result, indent=2))
    for path in [args.out] + ([str(Path(args.output_dir) / "results.json")] if args.output_dir else []):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
