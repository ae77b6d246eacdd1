"""Generate the embedded synthetic datasets in the real on-disk formats (see docs/data.md).

    python launch/make_data.py --out data/embedded --size 96 --num 200
    python launch/make_data.py --size 256 --num 10000 --workers 16 --preview docs/img/data_preview.png
"""
from __future__ import annotations

import argparse
import logging
import os
import time

from downstream.datasets import save_dataset_preview
from selfsup.data.synthetic import DEFAULT_NUM, DEFAULT_SEED, DEFAULT_SIZE, FORMATS, ensure_embedded_data, generate_datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output root (default: the embedded cache, "
                        "$SCENESSL_DATA or ~/.cache/scenessl, /embedded-v<version>-<size>-<num>-<seed>)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image height in pixels")
    parser.add_argument("--num", type=int, default=DEFAULT_NUM, help="images per dense dataset")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ",".join(FORMATS))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--preview", default=None, help="also save a PNG grid of PASCAL/NYUD samples here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    formats = [f for f in args.formats.split(",") if f]
    if args.out is None and set(formats) == set(FORMATS):
        root = ensure_embedded_data(size=args.size, num=args.num, seed=args.seed, workers=args.workers)
    else:
        root = generate_datasets(args.out or "data/embedded", size=args.size, num=args.num, seed=args.seed,
                                 formats=formats, workers=args.workers, progress=True)
    print(f"data root: {root} ({time.time() - start:.1f}s)")
    if args.preview:
        print(f"preview: {save_dataset_preview(root, args.preview)}")


if __name__ == "__main__":
    main()
