"""Probe protocols on pooled frozen features, by name: ``knn``, ``linear`` (class folders) and ``svm`` (VOC07).

``extract_probe_features`` gives, per kind of data a protocol needs, the L2-normalised pooled features of the
train and test splits; ``run_probes`` runs the named protocols on them. Features can be saved and reloaded
(``save_features``/``load_features``) so a sweep (e.g. over the SVM cost) does not re-extract.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import torch

from frozen.knn import extract_features, knn_accuracy, labelled_loaders
from selfsup.registry import Registry

from frozen.features import frozen_backbone
from .linear import train_linear_probe
from .svm import svm_map

PROBES = Registry("probe protocol")
# the data each protocol reads: default dataset name and its (train, test) splits
PROBE_DATA = {"single": ("classification", ("train", "val")), "multilabel": ("voc07", ("trainval", "test"))}
PROBE_KIND = {"knn": "single", "linear": "single", "svm": "multilabel"}


@PROBES.register("knn")
def knn_probe(data: Dict[str, object], **_) -> Dict[str, float]:
    """Cosine top-20 kNN, votes weighted exp(sim / 0.07): top-1 (%)."""
    return {"knn_top1": knn_accuracy(data["train"], data["test"], num_classes=data["num_classes"])}


@PROBES.register("linear")
def linear_probe(data: Dict[str, object], *, epochs: int = 100, seed: int = 0, **_) -> Dict[str, float]:
    """Linear layer, SGD lr 30, momentum 0.9, no weight decay, lr x0.1 at 60%/80%: top-1 (%)."""
    return train_linear_probe(data["train"], data["test"], num_classes=data["num_classes"], epochs=epochs, seed=seed)


@PROBES.register("svm")
def svm_probe(data: Dict[str, object], *, svm_cost: float = 0.5, **_) -> Dict[str, object]:
    """VOC07: a LinearSVC per class (C=0.5, class weights {1: 2, -1: 1}), difficult = negative: mAP (%)."""
    return svm_map(data["train"], data["test"], cost=svm_cost)


def parse_protocols(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        PROBES.get(name)  # unknown name: error listing the known ones
    if not names:
        raise KeyError(f"no probe protocol given; known: {', '.join(PROBES.names())}")
    return names


def extract_probe_features(protocols: Iterable[str], *, arch: str, weights: str, root: Optional[str],
                           data: Optional[str] = None, size: int = 64, resize: Optional[int] = None,
                           workers: int = 2) -> Dict[str, Dict[str, object]]:
    """{kind: {"train": (x, y), "test": (x, y), "num_classes", "dataset"}} for the kinds ``protocols`` need.

    ``data`` overrides the dataset name of the single-label protocols (default: class folders)."""
    kinds = sorted({PROBE_KIND[p] for p in protocols})
    backbone = frozen_backbone(arch, weights)
    device = next(backbone.parameters()).device
    out: Dict[str, Dict[str, object]] = {}
    for kind in kinds:
        name, splits = PROBE_DATA[kind]
        name = (data or name) if kind == "single" else name
        loaders, num_classes = labelled_loaders(name, root, size=size, workers=workers, splits=splits, resize=resize)
        train, test = (extract_features(backbone, loader, device=device) for loader in loaders)
        out[kind] = {"train": train, "test": test, "num_classes": num_classes, "dataset": name}
    return out


def run_probes(protocols: Iterable[str], features: Dict[str, Dict[str, object]], **options) -> Dict[str, object]:
    result: Dict[str, object] = {}
    for name in protocols:
        kind = PROBE_KIND[name]
        if kind not in features:
            raise KeyError(f"protocol {name!r} needs {kind} features, which the loaded file does not hold "
                           f"(it has: {', '.join(features) or 'none'})")
        result.update(PROBES.get(name)(features[kind], **options))
    return result


def save_features(path: Union[str, Path], features: Dict[str, Dict[str, object]], **meta: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"features": features, **meta}, path)


def load_features(path: Union[str, Path]) -> Dict[str, Dict[str, object]]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "features" not in blob:
        raise ValueError(f"{path}: not a features file written by --dump-features")
    return blob["features"]
