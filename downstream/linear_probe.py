#!/usr/bin/env python
"""Frozen-feature probes of a pretrained backbone on pooled, L2-normalised features (no finetuning).

Protocols (--protocol, comma-separated; default knn,linear):
  knn     cosine top-20 kNN classifier, votes weighted exp(sim/0.07), on class folders (top-1 %)
  linear  linear layer, SGD lr 30, momentum 0.9, no weight decay, 100 epochs, lr x0.1 at 60%/80% (top-1 %)
  svm     VOC07: one LinearSVC per class (C=0.5, class weights {1: 2, -1: 1}), difficult = negative (mAP %),
          on ImageSets/Main/<class>_{trainval,test}.txt

  python downstream/linear_probe.py --weights runs/demo/checkpoint.pth --backbone resnet_small   # embedded data
  python downstream/linear_probe.py --weights none --backbone resnet18          # random-init reference
  python downstream/linear_probe.py --protocol svm --weights W --backbone resnet50 --data-root /data/VOCdevkit/VOC2007 \\
      --size 224 --resize 256 --dump-features voc07_feats.pt --output-dir runs/svm
  python downstream/linear_probe.py --protocol svm --load-features voc07_feats.pt probe.svm_cost=1.0 --output-dir runs/svm_c1
Writes <output-dir>/results.json and config.yaml (default output dir: runs/linear_probe/<backbone>).
Config keys (key=value, or YAML with --config): output_dir, model.backbone, model.weights, data.root, data.name,
data.size, data.resize, probe.protocols, probe.epochs, probe.svm_cost, features.dump, features.load.
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
from selfsup.config import ConfigError, check_counts, load_config, nested_updates

from downstream.evaluation.protocols import (PROBE_KIND, extract_probe_features, load_features, parse_protocols,
                                             run_probes, save_features)

ENTRY = "downstream/linear_probe.py"


@dataclass
class ProbeDataConfig:
    root: str = "embedded"  # class folders {train,val}/<class>/ (knn, linear) or a VOC2007 root (svm), or 'embedded'
    name: Optional[str] = None  # dataset name of knn/linear (default: classification folders)
    size: int = 64  # centre-crop size (64 for the embedded data; 224 for real images)
    resize: Optional[int] = None  # shorter side before the crop (default: size; 256 with size 224)

    def __post_init__(self) -> None:
        check_counts(self, "data.", positive=("size", "resize"))


@dataclass
class ProbeSection:
    protocols: List[str] = field(default_factory=lambda: ["knn", "linear"])  # knn, linear, svm
    epochs: int = 100  # linear probe epochs
    svm_cost: float = 0.5  # LinearSVC C

    def __post_init__(self) -> None:
        check_counts(self, "probe.", positive=("epochs", "svm_cost"))
        parse_protocols(",".join(self.protocols))  # an unknown name: one line listing the known ones


@dataclass
class FeaturesConfig:
    dump: str = ""  # save the extracted features to this file
    load: str = ""  # reuse features saved by features.dump (no backbone)


@dataclass
class ProbeConfig:
    output_dir: str = ""  # default runs/linear_probe/<model.backbone>
    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    probe: ProbeSection = field(default_factory=ProbeSection)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)


def build_parser() -> argparse.ArgumentParser:
    p = entry_parser(__doc__, config_help="YAML with the differences from the defaults (keys below)",
                     output_help="results.json goes here (default: runs/linear_probe/<backbone>)",
                     weights=WEIGHTS_HELP + " (model.weights)", backbone=f"backbone: {BACKBONES_HELP}; must match "
                     "the weights (default resnet50)", launch=True)
    p.add_argument("--data-root", help="dataset root: class folders {train,val}/<class>/ (knn, linear) or a VOC2007 "
                                       "root (svm) (data.root; default: the embedded data)")
    add_deprecated(p, "--root", new="--data-root", dest="data_root")
    p.add_argument("--protocol", help="comma-separated: knn, linear, svm (probe.protocols; default knn,linear)")
    p.add_argument("--data", help="dataset name of knn/linear (data.name; default: classification folders)")
    p.add_argument("--size", type=int, help="centre-crop size (data.size; default 64 for the embedded data; 224 "
                                            "for real images)")
    p.add_argument("--resize", type=int, help="resize the shorter side to this before the crop (data.resize; "
                                              "default: --size; 256 with --size 224)")
    p.add_argument("--epochs", type=int, help="linear probe epochs (probe.epochs; default 100)")
    p.add_argument("--svm-cost", type=float, help="LinearSVC C (probe.svm_cost; default 0.5)")
    p.add_argument("--dump-features", metavar="FILE", help="save the extracted features to FILE (features.dump)")
    p.add_argument("--load-features", metavar="FILE",
                   help="reuse features saved by --dump-features (features.load; no backbone)")
    add_deprecated(p, "--out", new="--output-dir (results.json)", dest="out")
    return p


def flag_updates(args: argparse.Namespace) -> Dict[str, Any]:
    return nested_updates({
        "output_dir": args.output_dir, "model.backbone": args.backbone, "model.weights": args.weights,
        "data.root": args.data_root, "data.name": args.data, "data.size": args.size, "data.resize": args.resize,
        "probe.protocols": parse_protocols(args.protocol) if args.protocol else None, "probe.epochs": args.epochs,
        "probe.svm_cost": args.svm_cost, "features.dump": args.dump_features, "features.load": args.load_features})


def make_config(args: argparse.Namespace, extra: List[str] = ()) -> ProbeConfig:
    cfg = load_config(ProbeConfig, yaml_path=args.config, updates=flag_updates(args),
                      overrides=list(args.overrides) + list(extra))
    if not cfg.features.load:
        cfg.model.require_weights(" or --load-features FILE")
    elif not Path(cfg.features.load).is_file():
        raise FileNotFoundError(f"features.load={cfg.features.load}: no such file")
    kinds = {PROBE_KIND[name] for name in cfg.probe.protocols}
    if len(kinds) > 1 and cfg.data.root != "embedded":
        raise ConfigError("probe.protocols: svm reads a VOC07 root and knn/linear class folders: run them separately "
                          "with --data-root")
    if not cfg.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=f"runs/linear_probe/{cfg.model.backbone}")
    return cfg


def run_linear_probe(cfg: ProbeConfig, *, out_file: Optional[str] = None) -> Dict[str, Any]:
    """The probes; results.json and config.yaml in cfg.output_dir (and the JSON in ``out_file``, the former --out)."""
    logging.basicConfig(level=logging.INFO)
    protocols = cfg.probe.protocols
    if cfg.features.load:
        features = load_features(cfg.features.load)
    else:
        features = extract_probe_features(protocols, arch=cfg.model.backbone, weights=cfg.model.weights,
                                          root=cfg.data.root, data=cfg.data.name, size=cfg.data.size,
                                          resize=cfg.data.resize)
    if cfg.features.dump:
        save_features(cfg.features.dump, features, arch=cfg.model.backbone, weights=str(cfg.model.weights))
    result = run_probes(protocols, features, epochs=cfg.probe.epochs, svm_cost=cfg.probe.svm_cost)
    print(json.dumps(result, indent=2))
    out = Path(cfg.output_dir)
    write_config(cfg, out, entry=ENTRY)
    for path in [out / "results.json"] + ([Path(out_file)] if out_file else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    return result


@dataclass
class _ProbeJob:
    """run_linear_probe with the former --out file (a picklable callable for the launcher)."""
    out_file: Optional[str] = None

    def __call__(self, cfg: ProbeConfig) -> Dict[str, Any]:
        return run_linear_probe(cfg, out_file=self.out_file)


def main(argv: Optional[List[str]] = None) -> Any:
    args = parse(build_parser(), argv)
    with user_errors(args.debug):
        job = _ProbeJob(getattr(args, "out", None)) if getattr(args, "out", None) else run_linear_probe
        return launch(job, lambda extra: make_config(args, extra), args, processes=False)


if __name__ == "__main__":
    run_main(main)
