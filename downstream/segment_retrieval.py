#!/usr/bin/env python
"""PASCAL VOC semantic segment retrieval on frozen features (no finetuning).

Per image, spherical K-Means (K=15, faiss, seeded) on the L2-normalised pixel embeddings of the frozen
backbone's stride-8 features gives segments; train segments are labelled by majority ground truth; each val
segment takes the class of its nearest train segment (cosine, faiss.IndexFlatIP). Reports mIoU over the 21
classes and over the 7-class subset {aeroplane, bottle, bus, car, cat, cow, person}, in percent, with images/s,
into <output-dir>/results.json, and a figure (image, segments, retrieved labels, ground truth).
faiss runs on the GPU when its build has one, else on the CPU (the same code).

  python downstream/segment_retrieval.py --weights runs/x/checkpoint.pth --backbone resnet50 \\
      --data-root /data/VOCdevkit/VOC2012 --output-dir runs/x/retrieval         # real VOC 2012 train -> val
  python downstream/segment_retrieval.py --weights none --backbone resnet_small    # embedded data, random init
  python downstream/segment_retrieval.py --weights W --sweep retrieval.kmeans_seed=0,1,2 --slurm   # 3 jobs
Config keys (key=value, or YAML with --config): output_dir, figure, model.backbone, model.weights, data.root,
data.train_split, data.val_split, data.max_images, retrieval.clusters, retrieval.kmeans_seed, retrieval.fit_stride.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from selfsup.cli import (BACKBONES_HELP, WEIGHTS_HELP, BackboneConfig, add_deprecated, entry_parser, launch, parse,
                         run_main, user_errors, write_config)
from selfsup.config import check_counts, load_config, nested_updates
from frozen.voc import VOC2012Segmentation
from frozen.features import dense_extractor
from frozen.retrieval import run_retrieval

ENTRY = "downstream/segment_retrieval.py"


@dataclass
class RetrievalDataConfig:
    root: str = "embedded"  # VOC 2012 root (JPEGImages, SegmentationClass, ImageSets/Segmentation), or 'embedded'
    train_split: str = "train"  # the split whose segments are retrieved
    val_split: str = "val"  # the split that is evaluated
    max_images: Optional[int] = None  # only the first N images of each split

    def __post_init__(self) -> None:
        check_counts(self, "data.", positive=("max_images",))


@dataclass
class RetrievalSection:
    clusters: int = 15  # spherical K-Means clusters per image
    kmeans_seed: int = 0  # seed of the K-Means initialisation
    fit_stride: int = 1  # fit the centroids on every N-th pixel in both axes, then assign all (1: every pixel)

    def __post_init__(self) -> None:
        check_counts(self, "retrieval.", positive=("clusters", "fit_stride"))


@dataclass
class RetrievalConfig:
    output_dir: str = ""  # default runs/retrieval/<model.backbone>
    figure: bool = True  # retrieval.png: image, segments, retrieved labels, ground truth of 4 val images
    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)


def build_parser() -> argparse.ArgumentParser:
    p = entry_parser(__doc__, config_help="YAML with the differences from the defaults (keys below)",
                     output_help="results.json and retrieval.png (default: runs/retrieval/<backbone>)",
                     weights=WEIGHTS_HELP + " (model.weights)", backbone=f"backbone: {BACKBONES_HELP}; must match "
                     "the weights (default resnet50)", launch=True)
    p.add_argument("--data-root", help="VOC 2012 root holding JPEGImages, SegmentationClass, ImageSets/Segmentation "
                                       "(data.root; default: the embedded data)")
    p.add_argument("--train-split", help="split whose segments are retrieved (data.train_split; default train)")
    p.add_argument("--val-split", help="split that is evaluated (data.val_split; default val)")
    p.add_argument("--clusters", type=int, help="K-Means clusters per image (retrieval.clusters; default 15)")
    p.add_argument("--kmeans-seed", type=int, help="K-Means seed (retrieval.kmeans_seed; default 0)")
    add_deprecated(p, "--seed", new="--kmeans-seed (retrieval.kmeans_seed)", dest="kmeans_seed", type=int)
    p.add_argument("--fit-stride", type=int,
                   help="fit the centroids on every N-th pixel in both axes, then assign all (retrieval.fit_stride; "
                        "default 1: every pixel)")
    p.add_argument("--max-images", type=int, help="use only the first N images of each split (data.max_images)")
    return p


def flag_updates(args: argparse.Namespace) -> Dict[str, Any]:
    return nested_updates({
        "output_dir": args.output_dir, "model.backbone": args.backbone, "model.weights": args.weights,
        "data.root": args.data_root, "data.train_split": args.train_split, "data.val_split": args.val_split,
        "data.max_images": args.max_images, "retrieval.clusters": args.clusters,
        "retrieval.kmeans_seed": args.kmeans_seed, "retrieval.fit_stride": args.fit_stride})


def make_config(args: argparse.Namespace, extra: List[str] = ()) -> RetrievalConfig:
    cfg = load_config(RetrievalConfig, yaml_path=args.config, updates=flag_updates(args),
                      overrides=list(args.overrides) + list(extra))
    cfg.model.require_weights()
    if not cfg.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=f"runs/retrieval/{cfg.model.backbone}")
    return cfg


def run_segment_retrieval(cfg: RetrievalConfig) -> Dict[str, Any]:
    """Retrieval mIoU; results.json, retrieval.png and config.yaml in cfg.output_dir."""
    logging.basicConfig(level=logging.INFO)
    train_set = VOC2012Segmentation(cfg.data.root, split=cfg.data.train_split)
    val_set = VOC2012Segmentation(cfg.data.root, split=cfg.data.val_split)
    extractor = dense_extractor(cfg.model.backbone, cfg.model.weights)
    out = Path(cfg.output_dir)
    write_config(cfg, out, entry=ENTRY)
    r = cfg.retrieval
    result = run_retrieval(extractor, train_set, val_set, k=r.clusters, seed=r.kmeans_seed,
                           max_images=cfg.data.max_images, fit_stride=r.fit_stride,
                           figure=str(out / "retrieval.png") if cfg.figure else None)
    print(f"retrieval over {result['images']} images at {result['images_per_s']:.1f} images/s")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "iou_per_class"}, indent=2))
    return result


def main(argv: Optional[List[str]] = None) -> Any:
    args = parse(build_parser(), argv)
    with user_errors(args.debug):
        return launch(run_segment_retrieval, lambda extra: make_config(args, extra), args, processes=False)


if __name__ == "__main__":
    run_main(main)
