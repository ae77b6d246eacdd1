"""From an affinity file to a branched network: tree sizes, the two searches, the config finetune_mtl.py trains.

``affinity.npz`` (written by downstream/task_affinity.py): ``affinity`` [D, N, N], ``tasks`` [N], ``branch_points``
[D] (backbone stages), ``method`` (rsa | transfer), ``num_images`` (K) and ``config`` (the resolved MTL config as
YAML: backbone, heads, crop size and tasks of the networks the affinity was measured for).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import yaml

from selfsup.backbones import build_backbone
from selfsup.config import ConfigError, merge, save_config, to_dict

from .branched import component_sizes, pooling_above
from .config import MTLConfig
from .data import resolve_crop_size
from .tree_search import (Candidate, ComponentSizes, Tree, beam_search, budget_search, cheapest, clustering_cost,
                          enumerate_trees, format_tree, pareto_front, tree_to_lists)


def save_affinity(path: Union[str, Path], result: Mapping[str, object], cfg: MTLConfig) -> Path:
    path = Path(path)
    extra = {"losses": np.asarray(result["losses"])} if "losses" in result else {}
    np.savez(path, affinity=np.asarray(result["affinity"]), tasks=np.asarray(result["tasks"]),
             branch_points=np.asarray(result["branch_points"]), method=np.asarray(result["method"]),
             num_images=np.asarray(result["num_images"]), config=np.asarray(yaml.safe_dump(to_dict(cfg))), **extra)
    return path


def load_affinity(path: Union[str, Path]) -> Dict[str, object]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--affinity {path} does not exist (write it with downstream/task_affinity.py)")
    with np.load(path, allow_pickle=False) as data:
        missing = {"affinity", "tasks", "branch_points", "method", "num_images", "config"} - set(data.files)
        if missing:
            raise KeyError(f"{path} lacks {sorted(missing)}; it is not an affinity file of downstream/task_affinity.py")
        out = {"affinity": data["affinity"].astype(np.float64), "tasks": [str(t) for t in data["tasks"]],
               "branch_points": [int(p) for p in data["branch_points"]], "method": str(data["method"]),
               "num_images": int(data["num_images"]), "config": str(data["config"])}
    D, N = len(out["branch_points"]), len(out["tasks"])
    if out["affinity"].shape != (D, N, N):
        raise ConfigError(f"{path}: affinity has shape {out['affinity'].shape}, expected ({D}, {N}, {N})")
    return out


def config_of(affinity: Mapping[str, object]) -> MTLConfig:
    """The MTL config stored in the affinity file, as a branched network over its tasks and branch points."""
    cfg = merge(MTLConfig(), yaml.safe_load(affinity["config"]))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="branched",
                                                              branch_points=list(affinity["branch_points"])))


def sizes_of(cfg: MTLConfig) -> ComponentSizes:
    """Exact params / FLOPs of each part of the branched network of ``cfg`` (built on the meta device)."""
    from .train import model_from_config, task_set

    tasks = task_set(cfg)
    trivial = [[list(tasks.all)]] * len(cfg.model.branch_points)
    with torch.device("meta"):
        model = model_from_config(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, branching=trivial)))
    return component_sizes(model, resolve_crop_size(cfg.data))


def search(affinity: Mapping[str, object], cfg: MTLConfig, *, budget_params: Optional[float] = None,
           budget_flops: Optional[float] = None, alpha: Optional[float] = None, beam: int = 1) -> Dict[str, object]:
    """Pick a tree: min clustering cost within a params / FLOPs budget, or the α-complexity beam search.

    Returns ``tree``, ``cost``, ``params``, ``flops``, ``front`` (Pareto front of cost vs params over every tree)
    and ``candidates``."""
    tasks, dissim = list(affinity["tasks"]), 1.0 - np.asarray(affinity["affinity"])
    components = sizes_of(cfg)
    trees = enumerate_trees(tasks, dissim.shape[0])
    size = {t: components.tree_size(t) for t in trees}
    if alpha is not None:
        with torch.device("meta"):
            backbone = build_backbone(cfg.model.backbone, output_stride=cfg.model.output_stride)
        pools = pooling_above(backbone, cfg.model.branch_points)
        kept = beam_search(tasks, dissim, pooling_above=pools, alpha=alpha, beam=beam)
        candidates = [Candidate(t, clustering_cost(t, dissim, tasks), size[t]["params"], size[t]["flops"]) for t in trees]
        # among the kept trees tied with the best: the fewer params (tree_search's tie-break)
        chosen = cheapest([Candidate(t, c, size[t]["params"], size[t]["flops"]) for t, c in kept], order=trees)
        extra = {"pooling_above": pools, "alpha": alpha, "beam": beam}
    else:
        measure, budget = ("params", budget_params) if budget_params is not None else ("flops", budget_flops)
        if budget is None:
            raise ConfigError("give --budget-params, --budget-flops or --alpha (with --beam)")
        chosen, candidates = budget_search(trees, dissim, tasks, size, budget=budget, measure=measure)
        if chosen is None:
            smallest = min(candidates, key=lambda c: getattr(c, measure))
            raise ConfigError(f"no tree fits --budget-{measure} {budget:.6g}: the smallest (all shared) has "
                             f"{getattr(smallest, measure)} {measure}")
        extra = {"measure": measure, "budget": budget}
    return {"tree": chosen.tree, "cost": chosen.cost, "params": chosen.params, "flops": chosen.flops,
            "front": pareto_front(candidates), "candidates": candidates, "num_trees": len(trees), **extra}


def branched_config(cfg: MTLConfig, tree: Tree, path: Union[str, Path]) -> Path:
    """Write ``cfg`` with ``model.arch=branched`` and the tree: ``finetune_mtl.py --config PATH`` trains it."""
    out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="branched", branching=tree_to_lists(tree)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(out, path)
    return path


def format_front(front: Sequence[Candidate], chosen: Tree) -> List[str]:
    lines = [f"{'params (M)':>10} {'GFLOPs':>8} {'cost':>7}  tree (partitions per branch point)"]
    for c in front:
        mark = " <- chosen" if c.tree == chosen else ""
        lines.append(f"{c.params / 1e6:10.3f} {c.flops / 1e9:8.3f} {c.cost:7.3f}  {format_tree(c.tree)}{mark}")
    return lines
