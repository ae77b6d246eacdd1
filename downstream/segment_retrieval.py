#!/usr/bin/env python
"""PASCAL VOC semantic segment retrieval on frozen features (no finetuning).

Per image, spherical K-Means (K=15, faiss, seeded) on the L2-normalised pixel embeddings of the frozen
backbone's stride-8 features gives segments; train segments are labelled by majority ground truth; each val
segment takes the class of its nearest train segment (cosine, faiss.IndexFlatIP). Reports mIoU over the 21
classes and over the 7-class subset {aeroplane, bottle, bus, car, cat, cow, person}, in percent, with images/s,
into <output-dir>/results.json, and a figure (image, segments, retrieved labels, ground truth).
faiss runs on the GPU when its build has one, else on the CPU (the same code).

  python downstream/segment_retrieval.py --weights runs/x/checkpoint.pth --arch resnet50 \\
      --data-root /data/VOCdevkit/VOC2012 --output-dir runs/x/retrieval         # real VOC 2012 train -> val
  python downstream/segment_retrieval.py --weights none --arch resnet_small    # embedded data, random init
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import List, Optional

from selfsup.data import VOC2012Segmentation
from downstream.evaluation.features import add_common_args, dense_extractor
from downstream.evaluation.retrieval import run_retrieval
from selfsup.launcher import user_errors


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, data_help="VOC 2012 root holding JPEGImages, SegmentationClass, ImageSets/Segmentation",
                    output_help="results.json and retrieval.png (default: runs/retrieval_<arch>)")
    p.add_argument("--train-split", default="train", help="split whose segments are retrieved (default train)")
    p.add_argument("--val-split", default="val", help="split that is evaluated (default val)")
    p.add_argument("--clusters", type=int, default=15, help="K-Means clusters per image (default 15)")
    p.add_argument("--seed", type=int, default=0, help="K-Means seed")
    p.add_argument("--fit-stride", type=int, default=1,
                   help="fit the centroids on every N-th pixel in both axes, then assign all (default 1: every pixel)")
    p.add_argument("--max-images", type=int, default=None, help="use only the first N images of each split")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    with user_errors():  # bad data, checkpoints, paths: one line, no traceback
        run(args)


def run(args: argparse.Namespace) -> dict:
    train_set = VOC2012Segmentation(args.data_root, split=args.train_split)
    val_set = VOC2012Segmentation(args.data_root, split=args.val_split)
    out = Path(args.output_dir or f"runs/retrieval_{args.arch}")
    out.mkdir(parents=True, exist_ok=True)
    result = run_retrieval(dense_extractor(args.arch, args.weights), train_set, val_set, k=args.clusters,
                           seed=args.seed, max_images=args.max_images, fit_stride=args.fit_stride,
                           figure=str(out / "retrieval.png"))
    print(f"retrieval over {result['images']} images at {result['images_per_s']:.1f} images/s")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "iou_per_class"}, indent=2))
    return result


if __name__ == "__main__":
    main()
