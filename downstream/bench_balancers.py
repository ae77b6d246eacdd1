#!/usr/bin/env python
"""Loss balancers side by side: the cost of one training step with each, and the Δ_MTL comparison.

overhead: one process builds one MTL-baseline copy per balancer (same init, same synthetic batch) and times their
training steps interleaved (round r starts at balancer r), so the machine's load hits every balancer alike;
ratios are medians against ``fixed``.
compare: single-task references and the MTL baseline with each balancer via downstream/finetune_mtl.py, for each
seed; a table (markdown + JSON) of Δ_MTL over the seeds, the final weights, CPU minutes, and a bar chart. Runs
that finished are reused, interrupted ones resume, so rerunning the same command continues. --models adds other
multi-task architectures (configs/<dataset>/<model>.yaml, e.g. mti_net pad_net) with each balancer, same
references and seeds: the architecture comparison of docs/benchmarks.md.

  python downstream/bench_balancers.py overhead                     # ResNet-18 + FPN, NYUD tasks, 480x640, batch 8
  python downstream/bench_balancers.py overhead --dataset pascal_context --height 512 --width 512
  python downstream/bench_balancers.py overhead --same-budget --height 96 --width 128   # the compare's model, CPU
  python downstream/bench_balancers.py compare --dataset nyud --seeds 0 1 2 --jobs 2    # docs/mtl.md's table
  python downstream/bench_balancers.py compare --dataset pascal_context --balancers fixed dwa pcgrad --epochs 5
  python downstream/bench_balancers.py compare --balancers fixed cagrad cagrad:convention=libmtl --seeds 0
  python downstream/bench_balancers.py compare --balancers fixed --models mtl_baseline mti_net --weights W
Extra key=value arguments are finetune_mtl.py / MTLConfig overrides (e.g. model.backbone=resnet50). A balancer
may carry its parameters (optim.balancer_args) as NAME:key=value[,key=value...]: the same balancer with different
parameters side by side in one comparison (its runs go to NAME@key=value...).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from selfsup.cli import DEBUG_ENV, debug_from_env, run_main, user_errors
from selfsup.config import ConfigError, load_config, yaml_load
from selfsup.device import sync_device

from downstream.mtl.balancers import balancer_names, build_balancer
from downstream.mtl.bench import synthetic_batch
from downstream.mtl.config import MTLConfig
from downstream.mtl.engine import balanced_step
from downstream.mtl.losses import MultiTaskLoss
from downstream.mtl.tasks import LOWER_IS_BETTER, MAIN_METRIC, loss_weights
from downstream.mtl.train import balancer_shared_parts, build_optimizer, model_from_config, task_set

REPO = Path(__file__).resolve().parents[1]

# The budget of docs/mtl.md's same-budget tables: small backbone, narrow decoders, random init, no images to TensorBoard.
SAME_BUDGET = ["model.backbone=resnet_small", "model.fpn_channels=32", "model.head_channels=32", "model.task_channels=16"]
DATASETS = {  # config folder, the compared main tasks, extra overrides (PASCAL: the embedded images' size)
    "nyud": ("nyud", ["semseg", "depth"], []),
    "pascal_context": ("pascal", ["semseg", "sal", "normals"], ["data.crop_size=[96,96]"]),
}
BASELINE = "mtl_baseline"
METRIC_LABEL = {"miou": "mIoU", "maxf": "maxF", "mean": "mErr °", "rmse": "RMSE", "odsF": "ODS F"}


def parse_spec(spec: str) -> tuple:
    """``NAME`` or ``NAME:key=value[,key=value...]`` -> (name, balancer_args); a one-line error on a bad item."""
    name, _, rest = spec.partition(":")
    args: Dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--balancers {spec!r}: expected NAME:key=value[,key=value...], got item {item!r}")
        args[key.strip()] = yaml_load(raw, source=f"--balancers {spec!r}")
    return name, args


def spec_dir(spec: str) -> str:
    """The run folder of a balancer spec (``cagrad:convention=libmtl`` -> ``cagrad@convention=libmtl``)."""
    return spec.replace(":", "@").replace(",", "+")


# --------------------------------------------------------------------------------------------------- overhead
def time_balancers(names: Sequence[str], cfg: MTLConfig, *, size, batch_size: int, rounds: int, steps: int,
                   warmup: int, device: torch.device) -> List[Dict[str, Any]]:
    """Median seconds per training step (forward, balancer backward, Adam step) of each balancer, interleaved."""
    tasks = task_set(cfg)
    amp = cfg.amp and device.type == "cuda"
    images, targets = synthetic_batch(tasks, batch_size, size, device)
    criterion = MultiTaskLoss(loss_weights(tasks.dataset, tasks.all, cfg.optim.loss_weights))
    runs = {}
    for name in names:
        torch.manual_seed(0)  # the same initial model for every balancer
        model = model_from_config(cfg).to(device)
        if cfg.channels_last and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        bal_name, bal_args = parse_spec(name)
        balancer = build_balancer(bal_name, tasks=tasks.main, args=bal_args).to(device)
        runs[name] = dict(model=model.train(), balancer=balancer, shared=balancer_shared_parts(cfg, model, balancer),
                          optimizer=build_optimizer(cfg, model, balancer), step=0)  # the training run's own

    def train_step(name: str) -> None:
        r = runs[name]
        r["optimizer"].zero_grad(set_to_none=True)
        balanced_step(r["model"], images, targets, criterion, r["balancer"], shared=r["shared"], step=r["step"],
                      epoch=0, device=device, amp=amp)
        r["optimizer"].step()
        r["step"] += 1

    for name in names:
        for _ in range(warmup):
            train_step(name)
    seconds: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = list(names[r % len(names):]) + list(names[:r % len(names)])
        for name in order:
            sync_device(device)
            start = time.perf_counter()
            for _ in range(steps):
                train_step(name)
            sync_device(device)
            seconds[name].append((time.perf_counter() - start) / steps)
    base = statistics.median(seconds[names[0]])
    return [{"balancer": n, "ms_per_step": 1e3 * statistics.median(s), "ms_min": 1e3 * min(s), "ms_max": 1e3 * max(s),
             "vs_" + names[0]: statistics.median(s) / base, "weights": runs[n]["balancer"].weights()}
            for n, s in seconds.items()]


def overhead_markdown(rows: Sequence[Dict[str, Any]]) -> str:
    base = next(k for k in rows[0] if k.startswith("vs_"))
    lines = [f"| balancer | ms / step (median) | min–max over rounds | vs {base[3:]} |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['balancer']} | {r['ms_per_step']:.1f} | {r['ms_min']:.1f}–{r['ms_max']:.1f} | {r[base]:.2f}× |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- compare
@dataclass
class Job:
    name: str
    out: Path
    argv: List[str]
    log: Any = field(default=None, repr=False)
    proc: Any = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.out.with_name(self.out.name + ".log")


def _finetune_argv(config: Path, out: Path, seed: int, st_file: Path, args: argparse.Namespace, extra: Sequence[str]) -> List[str]:
    argv = [sys.executable, str(REPO / "downstream" / "finetune_mtl.py"), "--config", str(config), "--weights", args.weights,
            "--epochs", str(args.epochs), "--single-task-results", str(st_file), "--output-dir", str(out),
            f"seed={seed}", "progress=false", "vis_every=0", *SAME_BUDGET, *extra, *args.overrides]
    if args.data_root:
        argv += ["--data-root", args.data_root]
    return argv


def _wait_any(running: Dict[int, "Job"], poll_s: float = 0.5):
    """(pid, status, rusage) of one finished job of ``running``, or None after ``poll_s`` if none finished."""
    for pid in list(running):
        done_pid, status, usage = os.wait4(pid, os.WNOHANG)
        if done_pid == pid:
            return pid, status, usage
    time.sleep(poll_s)
    return None


def run_jobs(jobs: Sequence[Job], *, parallel: int, threads: int) -> int:
    """Runs ``jobs`` (``parallel`` at a time), skipping those with a results.json; writes each one's CPU seconds."""
    pending = [j for j in jobs if not (j.out / "results.json").is_file()]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    running: Dict[int, Job] = {}
    started = 0
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            job.out.mkdir(parents=True, exist_ok=True)
            job.log = open(job.log_path, "ab")
            # the Popen object is kept: a collected one would let the subprocess module reap the child (no rusage)
            job.proc = subprocess.Popen(job.argv, stdout=job.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            running[job.proc.pid] = job
            started += 1
            print(f"[{time.strftime('%H:%M:%S')}] start {job.name}", flush=True)
        finished = _wait_any(running)  # only our own children: other child processes of the caller stay theirs
        if finished is None:
            continue
        pid, status, usage = finished
        job = running.pop(pid)
        code = job.proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: the Popen must not wait again
        job.log.close()
        cpu = usage.ru_utime + usage.ru_stime
        if code != 0:
            tail = job.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise SystemExit(f"{job.name} failed (exit {code}); log {job.log_path} ends:\n  " + "\n  ".join(tail))
        (job.out / "bench_cpu.json").write_text(json.dumps({"cpu_s": cpu}))
        print(f"[{time.strftime('%H:%M:%S')}] done  {job.name} ({cpu / 60:.1f} CPU min)", flush=True)
    return started


def _cpu_minutes(out: Path) -> Optional[float]:
    path = out / "bench_cpu.json"
    return json.loads(path.read_text())["cpu_s"] / 60 if path.is_file() else None


def _defined(values: Sequence[Optional[float]]) -> List[float]:
    return [v for v in values if v is not None]  # None: Δ_MTL undefined (a single-task reference metric of 0)


def _spread(values: Sequence[Optional[float]]) -> str:
    values = _defined(values)
    if not values:
        return "n/a"
    return f"{statistics.mean(values):+.2f}" if len(values) == 1 else \
        f"{statistics.mean(values):+.2f} ({min(values):+.2f} … {max(values):+.2f})"


def run_name(model: str, spec: str) -> str:
    """A run's folder under ``s<seed>/`` and its row label: the balancer spec for the MTL baseline, else
    ``<model>+<spec>``."""
    return spec_dir(spec) if model == BASELINE else f"{model}+{spec_dir(spec)}"


def collect(root: Path, dataset: str, tasks: Sequence[str], balancers: Sequence[str], seeds: Sequence[int],
            models: Sequence[str] = ("mtl_baseline",)) -> Dict[str, Any]:
    """Per model and balancer: Δ_MTL and main metric per seed, the final weights (mean over seeds), CPU minutes."""
    def read(out: Path) -> Dict[str, Any]:
        return json.loads((out / "results.json").read_text())

    single = {}
    for t in tasks:
        values = [read(root / f"s{s}" / f"single_task_{t}")["metrics"][t][MAIN_METRIC[t]] for s in seeds]
        cpu = [_cpu_minutes(root / f"s{s}" / f"single_task_{t}") for s in seeds]
        single[t] = {"metric": values, "cpu_min": statistics.mean(cpu) if None not in cpu else None}
    rows = []
    for m, b in [(m, b) for m in models for b in balancers]:
        results = [read(root / f"s{s}" / run_name(m, b)) for s in seeds]
        cpu = [_cpu_minutes(root / f"s{s}" / run_name(m, b)) for s in seeds]
        rows.append({
            "balancer": b, "model": m, "label": b if m == BASELINE else f"{m} {b}",
            "delta_mtl": [r["delta_mtl"] for r in results],
            "metrics": {t: [r["metrics"][t][MAIN_METRIC[t]] for r in results] for t in tasks},
            "weights": {t: statistics.mean(r["balancer_weights"][t] for r in results) for t in tasks},
            "cpu_min": statistics.mean(cpu) if None not in cpu else None,
        })
    return {"dataset": dataset, "tasks": list(tasks), "seeds": list(seeds), "models": list(models),
            "single_task": single, "balancers": rows}


def compare_markdown(table: Dict[str, Any]) -> str:
    tasks = table["tasks"]
    head = [f"{t} {METRIC_LABEL.get(MAIN_METRIC[t], MAIN_METRIC[t])} {'↓' if LOWER_IS_BETTER[t] else '↑'}" for t in tasks]
    n = len(table["seeds"])
    fixed = next((r["delta_mtl"] for r in table["balancers"] if r["balancer"] == "fixed"
                  and r.get("model", BASELINE) == BASELINE), None)
    lines = [f"| {'model, balancer' if len(table.get('models', [BASELINE])) > 1 else 'balancer'} | {' | '.join(head)} | Δ_MTL % mean (min … max over {n} seeds) | Δ_MTL − fixed's, same "
             f"seed | final weights ({' / '.join(tasks)}) | CPU min |", "|---" * (len(tasks) + 5) + "|"]
    fmt = lambda v: f"{statistics.mean(v):.4g}"  # noqa: E731
    cpu = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    for t in tasks:
        cells = [fmt(table["single_task"][t]["metric"]) if s == t else "–" for s in tasks]
        lines.append(f"| single_task_{t} | {' | '.join(cells)} | – | – | – | {cpu(table['single_task'][t]['cpu_min'])} |")
    for r in table["balancers"]:
        weights = " / ".join(f"{r['weights'][t]:.3g}" for t in tasks)
        # paired by seed: the seed's single-task reference and initialisation cancel out
        paired = "–" if fixed is None or r["delta_mtl"] is fixed else _spread(
            [None if a is None or b is None else a - b for a, b in zip(r["delta_mtl"], fixed)])
        lines.append(f"| {r.get('label', r['balancer'])} | {' | '.join(fmt(r['metrics'][t]) for t in tasks)} | {_spread(r['delta_mtl'])} "
                     f"| {paired} | {weights} | {cpu(r['cpu_min'])} |")
    return "\n".join(lines)


def compare_chart(table: Dict[str, Any], path: Path) -> None:
    """Horizontal bars: mean Δ_MTL per balancer, the min–max over seeds as a whisker; 0 = the single-task set."""
    from PIL import Image, ImageDraw

    rows = [r for r in table["balancers"] if _defined(r["delta_mtl"])]
    values = [v for r in rows for v in _defined(r["delta_mtl"])]
    lo, hi = min(0.0, *values), max(0.0, *values)
    span = (hi - lo) or 1.0
    w, label_w, bar_h, top = 640, 110, 22, 34
    img = Image.new("RGB", (w, top + bar_h * len(rows) + 24), "white")
    draw = ImageDraw.Draw(img)
    x_of = lambda v: label_w + 10 + (v - lo) / span * (w - label_w - 60)  # noqa: E731
    models = ", ".join(table.get("models", [BASELINE])).replace(BASELINE, "MTL baseline")
    draw.text((8, 6), f"Delta_MTL % on {table['dataset']} ({', '.join(table['tasks'])}), {models}, "
                      f"{len(table['seeds'])} seed(s): mean, min-max over seeds", fill="black")
    draw.line([x_of(0), top - 4, x_of(0), top + bar_h * len(rows)], fill=(120, 120, 120))
    for i, r in enumerate(rows):
        y = top + i * bar_h
        deltas = _defined(r["delta_mtl"])
        mean = statistics.mean(deltas)
        draw.text((8, y + 5), r.get("label", r["balancer"]), fill="black")
        colour = (44, 160, 44) if mean >= 0 else (214, 39, 40)
        draw.rectangle([min(x_of(0), x_of(mean)), y + 4, max(x_of(0), x_of(mean)), y + bar_h - 4], fill=colour)
        cy = y + bar_h // 2
        draw.line([x_of(min(deltas)), cy, x_of(max(deltas)), cy], fill="black", width=2)
        for v in (min(deltas), max(deltas)):  # end caps: a whisker of one seed is a tick, not nothing
            draw.line([x_of(v), cy - 4, x_of(v), cy + 4], fill="black", width=2)
        draw.text((max(x_of(0), x_of(mean), x_of(max(deltas))) + 4, y + 5), f"{mean:+.2f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def compare(args: argparse.Namespace) -> Dict[str, Any]:
    folder, default_tasks, extra = DATASETS[args.dataset]
    tasks = args.tasks or default_tasks
    root = Path(args.output_dir) / args.dataset
    configs = REPO / "configs" / folder
    single, multi = [], []
    for s in args.seeds:
        st_file = root / f"s{s}" / "single_task.json"
        for t in tasks:
            out = root / f"s{s}" / f"single_task_{t}"
            single.append(Job(f"s{s}/single_task_{t}", out, _finetune_argv(
                configs / f"single_task_{t}.yaml", out, s, st_file, args, [*extra, f"data.tasks=[{t}]"])))
        for m, b in [(m, b) for m in args.models for b in args.balancers]:
            out = root / f"s{s}" / run_name(m, b)
            name, bal_args = parse_spec(b)
            multi.append(Job(f"s{s}/{run_name(m, b)}", out, _finetune_argv(configs / f"{m}.yaml", out, s, st_file, args, [
                *extra, f"data.tasks=[{','.join(tasks)}]", f"optim.balancer={name}",
                f"optim.balancer_args={json.dumps(bal_args)}"])))
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    started = run_jobs(single, parallel=args.jobs, threads=threads)  # the references first: MTL runs need them
    started += run_jobs(multi, parallel=args.jobs, threads=threads)
    table = collect(root, args.dataset, tasks, args.balancers, args.seeds, args.models)
    table["runs_started"] = started
    (root / "balancers.json").write_text(json.dumps(table, indent=2))
    markdown = compare_markdown(table)
    (root / "balancers.md").write_text(markdown + "\n")
    compare_chart(table, root / "balancers.png")
    print(markdown)
    print(f"-> {root}/balancers.{{md,json,png}} ({started} runs started, the others reused)")
    return table


# --------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("overhead", help="ms per training step of each balancer, side by side in one process")
    o.add_argument("--dataset", default="nyud", choices=sorted(DATASETS))
    o.add_argument("--tasks", nargs="+", help="main tasks (default: the dataset's mtl_baseline config)")
    o.add_argument("--height", type=int, default=480)
    o.add_argument("--width", type=int, default=640)
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median over rounds is reported")
    o.add_argument("--steps", type=int, default=5, help="timed steps per balancer and round")
    o.add_argument("--warmup", type=int, default=3)
    o.add_argument("--same-budget", action="store_true", help="the compare subcommand's small model (resnet_small, 32/32/16)")
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    o.add_argument("--output", help="write the rows as JSON here")
    c = sub.add_parser("compare", help="Δ_MTL of the MTL baseline (or each --models architecture) with each balancer vs the single-task models")
    c.add_argument("--dataset", default="nyud", choices=sorted(DATASETS))
    c.add_argument("--tasks", nargs="+", help="main tasks (default: nyud semseg depth; pascal_context semseg sal normals)")
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    c.add_argument("--epochs", type=int, default=15)
    c.add_argument("--weights", default="none", help="backbone weights for every run (default: random init)")
    c.add_argument("--data-root", help="dataset folder (default: the embedded data)")
    c.add_argument("--output-dir", default="runs/bench_balancers")
    c.add_argument("--jobs", type=int, default=1, help="runs at a time")
    c.add_argument("--models", nargs="+", default=[BASELINE],
                   help="multi-task configs of the dataset's folder (default: mtl_baseline), e.g. mtl_baseline mti_net")
    c.add_argument("--threads", type=int, default=0, help="OMP threads per run (default: cores / jobs)")
    for q in (o, c):
        q.add_argument("--balancers", nargs="+", default=balancer_names(),
                       help="default: all, fixed first; NAME:key=value[,...] gives the balancer parameters")
        q.add_argument("overrides", nargs="*", help="MTLConfig overrides key=value (of every run)")
        q.add_argument("--debug", action="store_true", default=debug_from_env(),
                       help=f"show the full traceback of a user error (also with {DEBUG_ENV}=1)")
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value anywhere, also after flags (a balancer spec NAME:key=value has a ':' before its '=')
    overrides = [a for a in argv if "=" in a and not a.startswith("-") and ":" not in a.partition("=")[0]]
    args = p.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    for spec in args.balancers:
        try:
            name, bal_args = parse_spec(spec)
        except (ValueError, ConfigError) as err:
            p.error(str(err))
        if name not in balancer_names():
            p.error(f"--balancers: unknown {name}; known: {', '.join(balancer_names())}")
        try:
            build_balancer(name, tasks=["semseg", "depth"], args=bal_args)  # the parameters, checked before any run
        except ConfigError as err:
            p.error(f"--balancers {spec!r}: {err}")
    if args.command == "compare":
        folder = DATASETS[args.dataset][0]
        missing = [m for m in args.models if m.startswith("single_task") or not (REPO / "configs" / folder / f"{m}.yaml").is_file()]
        if missing:
            known = sorted(p.stem for p in (REPO / "configs" / folder).glob("*.yaml") if not p.stem.startswith("single_task"))
            p.error(f"--models: no multi-task config configs/{folder}/{{{','.join(missing)}}}.yaml; known: {', '.join(known)}")
        if BASELINE in args.models:  # the baseline's rows first: the paired column reads its fixed run
            args.models = [BASELINE] + [m for m in args.models if m != BASELINE]
    if "fixed" in args.balancers:  # the reference row first
        args.balancers = ["fixed"] + [b for b in args.balancers if b != "fixed"]
    return args


def main(argv: Optional[List[str]] = None) -> Any:
    args = parse_args(argv)
    with user_errors(args.debug):
        return _main(args)


def _main(args: argparse.Namespace) -> Any:
    if args.command == "compare":
        return compare(args)
    folder, default_tasks, _ = DATASETS[args.dataset]
    overrides = [f"data.dataset={args.dataset}", f"data.tasks=[{','.join(args.tasks or default_tasks)}]",
                 "model.arch=mtl_baseline", *(SAME_BUDGET if args.same_budget else []), *args.overrides]
    cfg = load_config(MTLConfig, yaml_path=REPO / "configs" / folder / "mtl_baseline.yaml", overrides=overrides)
    rows = time_balancers(args.balancers, cfg, size=(args.height, args.width), batch_size=args.batch_size,
                          rounds=args.rounds, steps=args.steps, warmup=args.warmup, device=torch.device(args.device))
    print(f"MTL baseline, {cfg.model.backbone}, {args.dataset} {list(task_set(cfg).main)}, {args.height}x{args.width}, "
          f"batch {args.batch_size}, {args.device}, {args.rounds} rounds x {args.steps} steps")
    print(overhead_markdown(rows))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    run_main(main)
