#!/usr/bin/env python
"""The demo chain on the embedded data (what `make demo` runs): MoCo pretraining on the object-centric images,
export, then the pretrained backbone against a random-init one on every downstream protocol: MTL baseline
fine-tuning on the NYUD-format data (semseg mIoU, depth RMSE), kNN and linear probes, DAVIS-2017 label
propagation (J&F) and VOC segment retrieval (mIoU). Prints one table and writes summary.md, summary.json and
summary.png into the output dir. A rerun of the same output dir resumes: finished steps are read back.

Examples:
  python launch/demo.py                                        # configs/demo.yaml -> runs/demo
  python launch/demo.py checkpoint=runs/x/checkpoint.pth       # skip pretraining, use this checkpoint
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

from selfsup.launcher import user_errors

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. seed=1 checkpoint=ck.pth")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo YAML (default configs/demo.yaml)")
    p.add_argument("--output-dir", help="run directory (default runs/demo); a rerun resumes it")
    args = p.parse_intermixed_args(argv)
    from downstream.demo_chain import load_demo_config, run_demo

    with user_errors():
        overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
        run_demo(load_demo_config(args.config, overrides))


if __name__ == "__main__":
    main()
