#!/usr/bin/env python
"""Training throughput (img/s) and peak memory of MTL baseline, PAD-Net and MTI-Net, side by side:
plain fp32 vs bf16 autocast + channels_last (+ torch.compile with --compile).

Defaults: NYUD tasks (semseg + depth), ResNet-18 + FPN, 480x640, batch 8, on CUDA when available.
  python downstream/bench_mtl.py                                   # the H100 measurement
  python downstream/bench_mtl.py --backbone resnet50 --aux normals edge --compile --output-dir runs/bench_mtl
  python downstream/bench_mtl.py height=64 width=64 batch_size=2 steps=2 warmup=1 --narrow  # CPU test
  python downstream/bench_mtl.py --backbone hrnet18 --neck none --costs-only  # params/FLOPs at the published setting
Every flag is also a config key (its name with '_'), for key=value and --config YAML; --output-dir writes
results.json and config.yaml there.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import List, Optional

import torch

from selfsup.cli import apply_flag_config, entry_parser, parse, run_main, user_errors, write_config

from downstream.mtl.bench import architecture_costs, format_table, run_benchmarks
from downstream.mtl.flops import cost_table
from downstream.mtl.tasks import TaskSet

TINY = dict(fpn_channels=16, head_channels=16, task_channels=8, widths="narrow")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return _parse(argv)[0]


def _parse(argv: Optional[List[str]]) -> tuple:
    p = build_parser()
    args = parse(p, argv)
    cfg = apply_flag_config(p, args, "BenchMTLConfig")
    args.arch = args.backbone or "resnet18"
    return args, cfg


def build_parser() -> argparse.ArgumentParser:
    p = entry_parser(__doc__, config_help="YAML of flag values (keys: the flags' names with '_')",
                     output_help="write results.json here (default: print only; --output FILE also)",
                     backbone="backbone (with FPN): resnet18/34/50/101, hrnet18, resnet_tiny (default resnet18)",
                     overrides_help="flag values key=value, e.g. batch_size=2 steps=2")
    p.add_argument("--models", nargs="+", default=["mtl_baseline", "pad_net", "mti_net"])
    p.add_argument("--dataset", default="nyud", choices=["nyud", "pascal_context"])
    p.add_argument("--tasks", nargs="+", default=["semseg", "depth"])
    p.add_argument("--aux", nargs="*", default=[], help="auxiliary tasks, e.g. normals edge")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="timed training steps per model and mode")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time bf16+channels_last with torch.compile")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--neck", default="fpn", choices=["fpn", "none"], help="none: the backbone's own multi-scale maps "
                   "(the published HRNet-18 setting)")
    p.add_argument("--widths", default="published", choices=["published", "narrow"],
                   help="PAD-Net / MTI-Net block widths: the published code's, or model.task_channels everywhere")
    p.add_argument("--fpm-softmax", default="task", choices=["task", "published"], help="MTI-Net FPM softmax axis")
    p.add_argument("--fpm-reduction", type=int, default=0, help="MTI-Net FPM stack width N*C/this; 0: the widths' "
                   "default (published: 1, the paper's table; narrow: 4); 4 with published widths = the released code")
    p.add_argument("--narrow", action="store_true", help="16-channel FPN and heads, 8-channel task features (CPU tests)")
    p.add_argument("--costs-only", action="store_true", help="print the params/FLOPs table and skip the timing")
    p.add_argument("--output", help="write the results as JSON here")
    return p


def main(argv: Optional[List[str]] = None) -> list:
    args = parse(build_parser(), argv)
    with user_errors(args.debug):
        return _main(*_parse(argv))


def _main(args: argparse.Namespace, cfg: object) -> list:
    logging.basicConfig(level=logging.INFO)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest convolution algorithms once
    modes = ["fp32", "bf16_cl"] + (["bf16_cl_compile"] if args.compile else [])
    tasks = TaskSet(args.dataset, tuple(args.tasks), tuple(args.aux))
    model_kwargs = {"neck": args.neck, "widths": args.widths, "fpm_softmax": args.fpm_softmax,
                    "fpm_reduction": args.fpm_reduction, **(TINY if args.narrow else {})}
    common = dict(tasks=tasks, backbone=args.arch, size=(args.height, args.width), model_kwargs=model_kwargs)
    costs = architecture_costs(args.models, **common)
    print(f"# params / FLOPs per image at {args.height}x{args.width}, relative to the single-task set")
    print(cost_table(costs, [k for k in costs if k.startswith("single_task")]))
    if args.costs_only:
        _write(args, cfg, {"args": vars(args), "costs": costs})
        return []
    results = run_benchmarks(args.models, modes, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                             device=device, **common)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# training throughput: {args.arch}-FPN, {args.height}x{args.width}, batch {args.batch_size}, {name}")
    print(format_table(results, memory_label="peak" if device.type == "cuda" else "peak RSS"))
    _write(args, cfg, {"args": vars(args), "device": name, "costs": costs, "results": results})
    return results


def _write(args: argparse.Namespace, cfg: object, payload: dict) -> None:
    if args.output_dir:
        write_config(cfg, args.output_dir, entry="downstream/bench_mtl.py")
    for path in ([args.output] if args.output else []) + ([str(Path(args.output_dir) / "results.json")]
                                                          if args.output_dir else []):
        Path(path).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    run_main(main)
