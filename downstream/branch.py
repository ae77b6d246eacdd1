#!/usr/bin/env python
"""Choose the branched multi-task network from task affinities (branched multi-task networks, step 2).

Enumerates every tree (one task partition per branch point, each refining the one above), computes each tree's
exact params and FLOPs for the real architecture of the affinity file's config, and picks one:
  --budget-params P / --budget-flops F   minimum clustering cost among the trees within the budget (thesis)
  --alpha A --beam N                     cost + A*(branches-1)*2^(pooling layers above), top-down search keeping
                                         the N best groupings per depth (branched-networks paper)
Prints the chosen tree and the Pareto front (clustering cost vs params), draws the tree (PNG) and writes a config
that trains it:  python downstream/finetune_mtl.py --config OUTPUT/branched.yaml --weights W

Example:
  python downstream/branch.py --affinity runs/aff/affinity.npz --budget-params 25e6 --output-dir runs/aff/tree_25M
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

from selfsup.config import merge, parse_overrides
from selfsup.launcher import user_errors

from downstream.mtl.branch_plan import branched_config, config_of, format_front, load_affinity, search
from downstream.mtl.tree_plot import draw_tree
from downstream.mtl.tree_search import format_tree, tree_to_lists


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="changes to the stored config key=value (e.g. epochs=60 output_dir=...)")
    p.add_argument("--affinity", required=True, help="affinity.npz of downstream/task_affinity.py")
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument("--budget-params", type=float, help="parameter budget of the whole network (e.g. 25e6)")
    choice.add_argument("--budget-flops", type=float, help="FLOPs budget per image at the training crop (e.g. 80e9)")
    choice.add_argument("--alpha", type=float, help="weight of the complexity cost (the paper's α)")
    p.add_argument("--beam", type=int, default=1, help="with --alpha: groupings kept per depth (paper: 1 or 3)")
    p.add_argument("--output-dir", help="branched.yaml, tree.png, tree.json go here (default: next to the affinity file)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    with user_errors():
        affinity = load_affinity(args.affinity)
        cfg = merge(config_of(affinity), parse_overrides(args.overrides))
        result = search(affinity, cfg, budget_params=args.budget_params, budget_flops=args.budget_flops,
                        alpha=args.alpha, beam=args.beam)
    out = Path(args.output_dir) if args.output_dir else Path(args.affinity).parent
    tree = result["tree"]
    print(f"{result['num_trees']} trees over {affinity['tasks']} at stages {affinity['branch_points']} "
          f"({affinity['method']} affinity, K={affinity['num_images']})")
    print(f"chosen: {format_tree(tree)}\n  cost {result['cost']:.4f}, {result['params'] / 1e6:.3f}M params, "
          f"{result['flops'] / 1e9:.3f} GFLOPs")
    print("Pareto front (clustering cost vs params):\n" + "\n".join(format_front(result["front"], tree)))
    config = branched_config(cfg, tree, out / "branched.yaml")
    draw_tree(tree, out / "tree.png", level_names=[f"stage {p}" for p in affinity["branch_points"]],
              title=f"{affinity['method']}: {result['params'] / 1e6:.2f}M params, {result['flops'] / 1e9:.2f} GFLOPs")
    summary = {"tree": tree_to_lists(tree), "cost": result["cost"], "params": result["params"], "flops": result["flops"],
               "front": [{"tree": tree_to_lists(c.tree), "cost": c.cost, "params": c.params, "flops": c.flops}
                         for c in result["front"]]}
    (out / "tree.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {config} (train: python downstream/finetune_mtl.py --config {config}), {out / 'tree.png'}")
    return result


if __name__ == "__main__":
    main()
