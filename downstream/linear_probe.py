#!/usr/bin/env python
"""Frozen-feature evaluation of a pretrained backbone: linear probe and kNN classifier.

  python downstream/linear_probe.py --weights runs/demo/checkpoint.pth --arch resnet18
  python downstream/linear_probe.py --weights none --arch resnet18          # random-init reference
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import List, Optional

import torch

from selfsup.backbones import build_backbone
from selfsup.checkpoint import load_backbone_weights
from selfsup.knn_monitor import extract_features, knn_accuracy, labelled_loaders
from selfsup.launcher import user_errors
from downstream.evaluation.linear_probe import train_linear_probe

def evaluate(*, weights: str, arch: str, data: str = "classification", root: Optional[str] = "embedded",
             size: int = 64, epochs: int = 100, workers: int = 2) -> dict:
    backbone = build_backbone(arch)
    if weights != "none":
        load_backbone_weights(backbone, weights)
    loaders, num_classes = labelled_loaders(data, root, size=size, workers=workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone.to(device)
    train, val = (extract_features(backbone, loader, device=device) for loader in loaders)
    result = {"knn_top1": knn_accuracy(train, val, num_classes=num_classes)}
    result.update(train_linear_probe(train, val, num_classes=num_classes, epochs=epochs))
    return result


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint/exported backbone, or 'none' (random init)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--data", default="classification", help="class-folder dataset name")
    p.add_argument("--root", default="embedded", help="dataset root (default: the embedded data)")
    p.add_argument("--size", type=int, default=64, help="centre-crop size")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--out", help="write the results JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    with user_errors():
        result = evaluate(weights=args.weights, arch=args.arch, data=args.data, root=args.root, size=args.size,
                          epochs=args.epochs)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
