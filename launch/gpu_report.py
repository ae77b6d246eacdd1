#!/usr/bin/env python
"""The one table of ``launch/gpu_check.sh``: img/s of every measurement and the issue-20 targets.

    python launch/gpu_report.py --pretrain moco.json ours.json --mtl mtl.json [mtl_compile.json] --tests-rc 0

Targets: pretraining end to end with GPU augmentation >= 0.85 x the compute ceiling and >= 8 x the
torchvision/PIL DataLoader pipeline (both recipes); MTI-Net training >= 120 img/s; every gpu test passes.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

CEILING_RATIO, CPU_RATIO, MTI_NET_IMG_S = 0.85, 8.0, 120.0


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def report(pretrain: List[str], mtl: List[str], tests_rc: Optional[int]) -> tuple:
    """(table text, all targets met)."""
    rows, ok = [], True

    def target(name: str, value: float, goal: float, unit: str) -> None:
        nonlocal ok
        met = value >= goal
        ok &= met
        rows.append(f"| {name} | {value:.1f} {unit} | >= {goal:g} {unit} | {'met' if met else 'MISSED'} |")

    lines = ["| measurement | img/s |", "|---|---|"]
    device = None
    for path in pretrain:
        run = _load(path)
        a, r = run["args"], run["results"]
        device = run["device"]
        tag = f"pretrain {a['recipe']} {a['arch']} b{a['batch_size']}"
        for key in ("a_compute_ceiling", "b_end_to_end_gpu_aug", "c_end_to_end_cpu_aug", "loader_only_gpu_aug",
                    "loader_only_cpu_aug"):
            lines.append(f"| {tag}: {key} | {r[key]:.1f} |")
        target(f"{tag}: end-to-end / ceiling", r["ratio_b_over_a"], CEILING_RATIO, "x")
        target(f"{tag}: end-to-end / torchvision-PIL", r["ratio_b_over_c"], CPU_RATIO, "x")
    best_mti = None
    for path in mtl:
        run = _load(path)
        a = run["args"]
        device = device or run["device"]
        for r in run["results"]:
            lines.append(f"| mtl {r['arch']} {a['arch']} {a['height']}x{a['width']} b{a['batch_size']} {r['mode']} "
                         f"| {r['img_per_s']:.1f} |")
            if r["arch"] == "mti_net":
                best_mti = max(best_mti or 0.0, r["img_per_s"])
    if best_mti is not None:
        target("MTI-Net training (best mode)", best_mti, MTI_NET_IMG_S, "img/s")
    if tests_rc is not None:
        ok &= tests_rc == 0
        rows.append(f"| gpu tests | exit {tests_rc} | exit 0 | {'met' if tests_rc == 0 else 'MISSED'} |")
    text = "\n".join([f"# gpu_check on {device}", *lines, "", "| target | measured | goal | |", "|---|---|---|---|",
                      *rows])
    return text, ok


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain", nargs="*", default=[], help="JSON files of launch/bench_pretrain.py --output")
    p.add_argument("--mtl", nargs="*", default=[], help="JSON files of downstream/bench_mtl.py --output")
    p.add_argument("--tests-rc", type=int, default=None, help="exit status of the gpu tests")
    args = p.parse_args(argv)
    text, ok = report(args.pretrain, args.mtl, args.tests_rc)
    print(text)
    print("all targets met" if ok else "some targets MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
