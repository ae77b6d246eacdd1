"""Δ_MTL: mean relative gain of a multi-task model over the single-task models, main metric per task.

``Δ_MTL = (1/T) Σ_t (-1)^{l_t} (M_t - M_st,t) / M_st,t`` with l_t = 1 where lower is better.
Single-task results are stored as ``{task: {metric: value}}`` JSON (written by single-task runs).
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Dict, Mapping, Sequence, Union

from .tasks import TASKS


class MissingSingleTaskResults(RuntimeError):
    """The single-task reference for Δ_MTL is absent; the message says how to create it."""


class UndefinedDelta(ValueError):
    """A single-task reference metric is 0: no relative gain can be computed."""


def delta_mtl(results: Mapping[str, Mapping[str, float]], single_task: Mapping[str, Mapping[str, float]],
              tasks: Sequence[str]) -> float:
    """Δ_MTL in percent over ``tasks``."""
    if not tasks:
        raise ValueError("Δ_MTL needs at least one task")
    missing = [t for t in tasks if t not in single_task]
    if missing:
        raise MissingSingleTaskResults(
            f"no single-task result for {missing} (have: {sorted(single_task)}); train the single-task model of each "
            f"task with the same --single-task-results file first, e.g. --config configs/<dataset>/single_task_{missing[0]}.yaml")
    total = 0.0
    for t in tasks:
        metric = TASKS[t].metric
        ours, ref = float(results[t][metric]), float(single_task[t][metric])
        if ref == 0:
            raise UndefinedDelta(f"Δ_MTL is undefined: the single-task {t} {metric} is 0 (a relative gain needs a "
                                 f"non-zero reference; train the single-task model longer)")
        sign = -1.0 if TASKS[t].lower_is_better else 1.0
        total += sign * (ours - ref) / ref
    return 100.0 * total / len(tasks)


def load_single_task_results(path: Union[str, Path]) -> Dict[str, Dict[str, float]]:
    path = Path(path)
    if not path.is_file():
        raise MissingSingleTaskResults(
            f"single-task results file {path} does not exist: run the single-task configs with "
            f"--single-task-results {path} first (each run adds its task)")
    return json.loads(path.read_text())


def record_single_task_result(path: Union[str, Path], task: str, metrics: Mapping[str, float], *,
                              extra: Mapping[str, float] = ()) -> None:
    """Add (or replace) ``task``'s metrics in the JSON at ``path``; written atomically.

    Read-modify-write under an exclusive lock on ``<path>.lock``: single-task runs finishing at the same time
    (parallel jobs, SLURM arrays) each keep their task."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[task] = {**dict(metrics), **dict(extra)}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        tmp.replace(path)
