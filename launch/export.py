#!/usr/bin/env python
"""Export the backbone of a pretraining checkpoint.

  python launch/export.py --weights runs/demo/checkpoint.pth --format torchvision --out backbone.pth
  python launch/export.py --weights CHECKPOINT --format detectron2 --out backbone.pkl
  python launch/export.py --weights CHECKPOINT --format moco --out moco_v2_format.pth.tar
  python launch/export.py --weights CHECKPOINT --format torchvision --output-dir runs/export  # -> backbone_torchvision.pth

--format moco writes main_moco.py's training checkpoint (both encoders, the queues, the SGD state renumbered
for SGD(model.parameters()), epochs completed), so the official scripts can resume from it.
The resolved config goes to <output-dir>/config.yaml (default output dir: the folder of --out, else runs/export;
config.export.yaml when that folder holds another run's config.yaml, e.g. the pretraining run's).
Config keys (key=value, or YAML with --config): output_dir, weights, format, out, optimizer.
"""
# no `from __future__ import annotations`: the dataclass below must also build when this file is loaded by path
# (importlib without a sys.modules entry), which string annotations would need
import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from selfsup.cli import entry_parser, run_main, user_errors, write_config
from selfsup.config import ConfigError, load_config, nested_updates, warn_deprecated
from selfsup.exporters import FORMATS, export_backbone

ENTRY = "launch/export.py"
SUFFIX = {"torchvision": ".pth", "detectron2": ".pkl", "moco": ".pth.tar"}


@dataclass
class ExportConfig:
    output_dir: str = ""  # default: the folder of `out`, else runs/export
    weights: str = ""  # our checkpoint.pth (or an official MoCo checkpoint); required
    format: str = ""  # torchvision | detectron2 | moco; required
    out: str = ""  # the exported file (default <output_dir>/backbone_<format><suffix>)
    optimizer: Optional[bool] = None  # format moco: require (true) or leave out (false); None: when present

    def __post_init__(self) -> None:
        if self.format and self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.optimizer is not None and self.format and self.format != "moco":
            raise ConfigError("optimizer (--optimizer/--no-optimizer) applies to format moco only")


def build_parser() -> argparse.ArgumentParser:
    p = entry_parser(__doc__, config_help="YAML with the differences from the defaults (keys below)",
                     output_help="folder of the export's config (default: the folder of --out, else runs/export)",
                     weights="the pretraining checkpoint.pth to export (or an official MoCo checkpoint)")
    p.add_argument("--format", choices=FORMATS, help="export format (format)")
    p.add_argument("--out", help="output file (out; default <output-dir>/backbone_<format><suffix>)")
    p.add_argument("--optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="--format moco: require (--optimizer) or leave out (--no-optimizer) the optimizer state; "
                        "default: included when the checkpoint has it (a warning otherwise)")
    return p


def make_config(args: argparse.Namespace) -> ExportConfig:
    overrides = [o for o in args.overrides if "=" in o]
    positional = [o for o in args.overrides if "=" not in o]
    weights = args.weights
    if positional:  # the former spelling: launch/export.py CHECKPOINT
        if len(positional) > 1 or weights:
            raise ConfigError(f"unexpected arguments {positional}: give the checkpoint as --weights FILE and config "
                              f"overrides as key=value")
        warn_deprecated("the positional CHECKPOINT argument", "--weights CHECKPOINT")
        weights = positional[0]
    cfg = load_config(ExportConfig, yaml_path=args.config, overrides=overrides, updates=nested_updates({
        "output_dir": args.output_dir, "weights": weights, "format": args.format, "out": args.out,
        "optimizer": args.optimizer}))
    if not cfg.weights:
        raise ConfigError("weights is not set: give --weights CHECKPOINT")
    if not cfg.format:
        raise ConfigError(f"format is not set: give --format {'|'.join(FORMATS)}")
    output_dir = cfg.output_dir or (str(Path(cfg.out).parent) if cfg.out else "runs/export")
    out = cfg.out or str(Path(output_dir) / f"backbone_{cfg.format}{SUFFIX[cfg.format]}")
    return dataclasses.replace(cfg, output_dir=output_dir, out=out)


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_intermixed_args(argv)  # positionals without '=': the former CHECKPOINT argument
    with user_errors(args.debug):
        cfg = make_config(args)
        out = export_backbone(cfg.weights, fmt=cfg.format, out=cfg.out, optimizer=cfg.optimizer)
        write_config(cfg, cfg.output_dir, entry=ENTRY)
    print(f"wrote {cfg.format} backbone to {out}")


if __name__ == "__main__":
    run_main(main)
