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

from selfsup.cli import entry_parser, parse, run_main, user_errors
from selfsup.config import ConfigError, load_yaml, merge, parse_overrides

from downstream.mtl.branch_plan import branched_config, config_of, format_front, load_affinity, search
from downstream.mtl.tree_plot import draw_tree
from downstream.mtl.tree_search import format_tree, tree_to_lists


def build_parser() -> argparse.ArgumentParser:
    p = entry_parser(__doc__, config_help="YAML of changes to the affinity file's stored config (before key=value)",
                     output_help="branched.yaml (the resolved config that trains the tree), tree.png, tree.json go "
                                 "here (default: next to the affinity file)",
                     overrides_help="changes to the stored config key=value (e.g. epochs=60 output_dir=...)")
    p.add_argument("--affinity", required=True, help="affinity.npz of downstream/task_affinity.py")
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument("--budget-params", type=float, help="parameter budget of the whole network (e.g. 25e6)")
    choice.add_argument("--budget-flops", type=float, help="FLOPs budget per image at the training crop (e.g. 80e9)")
    choice.add_argument("--alpha", type=float, help="weight of the complexity cost (the paper's α)")
    p.add_argument("--beam", type=int, default=1, help="with --alpha: groupings kept per depth (paper: 1 or 3)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return parse(build_parser(), argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    with user_errors(args.debug):
        affinity = load_affinity(args.affinity)
        cfg = config_of(affinity)
        for source, read in ((args.config, lambda: load_yaml(args.config)), ("command-line overrides",
                                                                             lambda: parse_overrides(args.overrides))):
            if source:
                try:
                    cfg = merge(cfg, read())
                except (TypeError, ValueError) as err:
                    raise ConfigError(f"{source}: {err}") from None
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
    run_main(main)
