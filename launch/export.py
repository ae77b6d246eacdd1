#!/usr/bin/env python
"""Export the backbone of a pretraining checkpoint.

  python launch/export.py runs/demo/checkpoint.pth --format torchvision --out backbone.pth
  python launch/export.py CHECKPOINT --format detectron2 --out backbone.pkl
  python launch/export.py CHECKPOINT --format moco --out moco_v2_format.pth.tar

--format moco writes main_moco.py's training checkpoint (both encoders, the queues, the SGD state renumbered
for SGD(model.parameters()), epochs completed), so the official scripts can resume from it.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from selfsup.exporters import FORMATS, export_backbone
from selfsup.launcher import user_errors


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="our checkpoint.pth (or an official MoCo checkpoint)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="--format moco: require (--optimizer) or leave out (--no-optimizer) the optimizer state; "
                        "default: included when the checkpoint has it (a warning otherwise)")
    args = p.parse_args(argv)
    if args.optimizer is not None and args.format != "moco":
        p.error("--optimizer/--no-optimizer apply to --format moco only")
    with user_errors():
        out = export_backbone(args.checkpoint, fmt=args.format, out=args.out, optimizer=args.optimizer)
    print(f"wrote {args.format} backbone to {out}")


if __name__ == "__main__":
    main()
