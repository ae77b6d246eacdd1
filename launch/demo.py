#!/usr/bin/env python
"""The demo chain on the embedded data (what `make demo` runs): MoCo pretraining on the object-centric images,
export, then the pretrained backbone against a random-init one on every downstream protocol: MTL baseline
fine-tuning on the NYUD-format data (semseg mIoU, depth RMSE), kNN and linear probes, DAVIS-2017 label
propagation (J&F) and VOC segment retrieval (mIoU). Prints one table and writes summary.md, summary.json and
summary.png into the output dir. A rerun of the same output dir resumes: finished steps are read back.

Examples:
  python launch/demo.py                                        # configs/demo.yaml -> runs/demo
  python launch/demo.py --weights runs/x/checkpoint.pth        # skip pretraining, use this checkpoint (checkpoint=)
  python launch/demo.py seed=1 --output-dir runs/demo_seed1    # another fine-tuning/probe/random-init seed
  python launch/demo.py 'steps=[finetune]' finetune_overrides='[epochs=5]'
Keys (configs/demo.yaml, downstream/demo_chain.py DemoConfig): output_dir, seed, steps, pretrain_config,
pretrain_overrides, checkpoint, finetune_config, finetune_overrides, probe_epochs, probe_size, probe_images,
retrieval_fit_stride, threads, spread, spread_command.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

from selfsup.cli import entry_parser, launch, parse, run_main, user_errors

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    return entry_parser(__doc__, config_help="demo YAML (default configs/demo.yaml)",
                        output_help="run directory (default runs/demo); a rerun resumes it",
                        weights="an existing pretraining checkpoint: skip the pretraining step (config key checkpoint)",
                        launch=True, overrides_help="config overrides key=value, e.g. seed=1 checkpoint=ck.pth")


def main(argv: Optional[List[str]] = None) -> None:
    args = parse(build_parser(), argv)
    from downstream.demo_chain import load_demo_config, run_demo

    def make_cfg(extra: List[str]):
        flags = [f"output_dir={args.output_dir}"] if args.output_dir else []
        flags += [f"checkpoint={args.weights}"] if args.weights else []
        return load_demo_config(args.config or str(DEFAULT_CONFIG), flags + list(args.overrides) + list(extra))

    with user_errors(args.debug):
        launch(run_demo, make_cfg, args, processes=False)


if __name__ == "__main__":
    run_main(main)
