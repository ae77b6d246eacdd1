#!/usr/bin/env python
"""Same-budget ablation of the improved recipe in the paper's order: MoCo-v2, + constrained multi-crop,
+ Standard-or-AutoAugment, + kNN positives; each arm pretrained at every seed on the embedded data (the demo's
budget: configs/pretrain/demo_objects.yaml) and evaluated on the six rows of `make demo` (NYUD semseg and depth
with the MTL baseline, kNN and linear probes, DAVIS-2017 J&F, VOC retrieval mIoU) against a random-init
backbone of the same seed. Writes <output-dir>/<dataset>/ablation.md (mean ± half the seed spread), .json and
.png (kNN-monitor curves of all arms) plus every run's folder; a rerun resumes where it stopped.

Examples:
  python launch/bench_recipe.py                                   # objects, 4 arms x seeds 0 1 2 -> runs/bench_recipe
  python launch/bench_recipe.py dataset=scenes                    # pretrain on the embedded COCO-format scenes
  python launch/bench_recipe.py 'seeds=[3]' 'arms=[moco_v2,knn]' 'steps=[probes]'
  python launch/bench_recipe.py 'pretrain_overrides=[train.epochs=20]' 'demo_overrides=[data_seed=7]'
  python launch/bench_recipe.py 'arms=[moco_v2]' vary_data_seed=true --output-dir runs/demo_spread   # make demo's spread
Keys (downstream/recipe_ablation.py RecipeAblationConfig): output_dir, dataset, arms, seeds, demo_config,
vary_data_seed, demo_overrides, pretrain_overrides, steps, small_size, scene_images. Results: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from selfsup.cli import entry_parser, launch, parse, run_main, user_errors


def build_parser() -> argparse.ArgumentParser:
    return entry_parser(__doc__, config_help="YAML of RecipeAblationConfig keys (default: the built-in defaults)",
                        output_help="ablation folder (default runs/bench_recipe); a rerun resumes it",
                        launch=True, overrides_help="config overrides key=value, e.g. dataset=scenes 'seeds=[0,1]'")


def main(argv: Optional[List[str]] = None) -> None:
    args = parse(build_parser(), argv)
    from downstream.recipe_ablation import load_ablation_config, run_ablation

    def make_cfg(extra: List[str]):
        flags = [f"output_dir={args.output_dir}"] if args.output_dir else []
        return load_ablation_config(args.config, flags + list(args.overrides) + list(extra))

    with user_errors(args.debug):
        launch(run_ablation, make_cfg, args, processes=False)


if __name__ == "__main__":
    run_main(main)
