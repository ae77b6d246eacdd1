"""Generate the embedded synthetic datasets in the real on-disk formats (see docs/data.md).

    python launch/make_data.py --output-dir data/embedded --size 96 --num 200
    python launch/make_data.py --size 256 --num 10000 --workers 16 --preview docs/img/data_preview.png
    python launch/make_data.py size=128 num=50 formats=nyud,voc2012 --output-dir data/small   # flags as key=value
Every flag is also a config key (its name with '_'), for key=value and --config YAML.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import List, Optional

from selfsup.cli import add_deprecated, apply_flag_config, entry_parser, parse, run_main, user_errors, write_config
from selfsup.config import ConfigError

from downstream.datasets import save_dataset_preview
from selfsup.data.synthetic import DEFAULT_NUM, DEFAULT_SEED, DEFAULT_SIZE, FORMATS, ensure_embedded_data, generate_datasets


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(__doc__, config_help="YAML of flag values (keys: the flags' names with '_')",
                          output_help="output root (default: the embedded cache, $SCENESSL_DATA or "
                                      "~/.cache/scenessl, /embedded-v<version>-<size>-<num>-<seed>; config.yaml is "
                                      "written only into a given --output-dir)",
                          overrides_help="flag values key=value, e.g. size=128 num=50")
    add_deprecated(parser, "--out", new="--output-dir", dest="output_dir")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image height in pixels")
    parser.add_argument("--num", type=int, default=DEFAULT_NUM, help="images per dense dataset")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ",".join(FORMATS))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--preview", default=None, help="also save a PNG grid of PASCAL/NYUD samples here")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parse(parser, argv)
    with user_errors(args.debug):
        cfg = apply_flag_config(parser, args, "MakeDataConfig")
        formats = [f for f in args.formats.split(",") if f]
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ConfigError(f"formats: unknown {', '.join(unknown)}; known: {', '.join(FORMATS)}")
        run(args, formats, cfg)


def run(args: argparse.Namespace, formats: List[str], cfg: object) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    if args.output_dir is None and set(formats) == set(FORMATS):
        root = ensure_embedded_data(size=args.size, num=args.num, seed=args.seed, workers=args.workers)
    else:
        root = generate_datasets(args.output_dir or "data/embedded", size=args.size, num=args.num, seed=args.seed,
                                 formats=formats, workers=args.workers, progress=True)
    if args.output_dir:
        write_config(cfg, root, entry="launch/make_data.py")
    print(f"data root: {root} ({time.time() - start:.1f}s)")
    if args.preview:
        print(f"preview: {save_dataset_preview(root, args.preview)}")


if __name__ == "__main__":
    run_main(main)
