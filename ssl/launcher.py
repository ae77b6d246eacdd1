"""One launcher for every entry point: one local process, N local processes, or SLURM jobs via submitit.

An entry point adds the flags with :func:`add_launch_args` and hands its per-process training function to
:func:`launch`::

    parser = argparse.ArgumentParser()
    add_launch_args(parser)
    args, overrides = parser.parse_known_args()
    launch(run_pretraining, lambda extra: make_cfg(args, overrides + extra), args)

``fn(cfg)`` runs in every process with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set;
it calls :func:`selfsup.distributed.init_distributed` itself, scales the learning rate and shards data by the real
world size, and resumes from ``cfg.output_dir``'s last checkpoint, so a requeued SLURM job simply continues.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import logging
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

TrainFn = Callable[[Any], Any]
MakeConfig = Callable[[List[str]], Any]


def add_launch_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the local/SLURM launch flags (a group named 'launch') to ``parser``."""
    group = parser.add_argument_group("launch")
    group.add_argument("--gpus", type=int, default=1, metavar="N",
                       help="local run: number of processes on this machine (one per GPU; gloo on CPU)")
    group.add_argument("--slurm", action="store_true", help="submit to SLURM with submitit instead of running here")
    group.add_argument("--nodes", type=int, default=1, help="SLURM: number of nodes")
    group.add_argument("--gpus-per-node", type=int, default=0, help="SLURM: GPUs per node (one task per GPU)")
    group.add_argument("--tasks-per-node", type=int, default=None,
                       help="SLURM: processes per node (default: --gpus-per-node, at least 1)")
    group.add_argument("--cpus-per-task", type=int, default=8, help="SLURM: CPU cores per process")
    group.add_argument("--mem-gb", type=float, default=None, help="SLURM: memory per node in GB (default: site's)")
    group.add_argument("--partition", default=None, help="SLURM: partition (default: the cluster's default)")
    group.add_argument("--timeout-min", type=int, default=4320,
                       help="SLURM: time limit per allocation; on timeout the job checkpoints and is requeued")
    group.add_argument("--account", default=None, help="SLURM: --account")
    group.add_argument("--qos", default=None, help="SLURM: --qos")
    group.add_argument("--constraint", default=None, help="SLURM: --constraint (e.g. volta32gb)")
    group.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                       help="SLURM: any other sbatch option, e.g. --slurm-extra exclusive --slurm-extra "
                            "comment=ablation (repeatable)")
    group.add_argument("--job-dir", default=None,
                       help="SLURM: folder for submitit's scripts, pickles and logs (default: <output_dir>/slurm)")
    group.add_argument("--job-name", default=None, help="SLURM: job name (default: the training function's name)")
    group.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="one run per value (a SLURM job array with --slurm); output_dir gets a "
                            "'KEY=V' subfolder per run; repeat for a grid")
    return parser


# ---------------------------------------------------------------- sweeps and SLURM parameters

def parse_key_values(items: Sequence[str]) -> Dict[str, Any]:
    """``['exclusive', 'comment=x']`` -> ``{'exclusive': True, 'comment': 'x'}`` (sbatch flags, '-' or '_')."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ValueError(f"--slurm-extra expects KEY=VALUE or KEY, got {item!r}")
        out[key.replace("-", "_")] = value if sep else True
    return out


def expand_sweep(sweeps: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """``['optim.lr=0.1,0.3']`` -> ``[('optim.lr=0.1', ['optim.lr=0.1']), ('optim.lr=0.3', ['optim.lr=0.3'])]``.

    Each entry is (run name, config overrides); several sweeps give their Cartesian product.
    No sweep gives one run with no name and no overrides.
    """
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not choices:
            raise ValueError(f"--sweep expects KEY=V1,V2,..., got {sweep!r}")
        axes.append([f"{key.strip()}={v}" for v in choices])
    if not axes:
        return [("", [])]
    return [(",".join(combo).replace("/", "_"), list(combo)) for combo in itertools.product(*axes)]


def build_configs(make_cfg: MakeConfig, sweeps: Sequence[str]) -> List[Any]:
    """One config per sweep point; a named run's ``output_dir`` is ``<output_dir>/<key=value>``."""
    cfgs = []
    for name, overrides in expand_sweep(sweeps):
        cfg = make_cfg(list(overrides))
        if name:
            cfg = _with_output_dir(cfg, str(Path(cfg.output_dir) / name))
        cfgs.append(cfg)
    return cfgs


def _with_output_dir(cfg: Any, output_dir: str) -> Any:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.replace(cfg, output_dir=output_dir)
    cfg.output_dir = output_dir
    return cfg


def slurm_parameters(args: argparse.Namespace, *, name: str = "train") -> Dict[str, Any]:
    """submitit ``AutoExecutor.update_parameters`` keyword arguments for the launch ``args``."""
    tasks = args.tasks_per_node if args.tasks_per_node else max(1, args.gpus_per_node)
    additional = {key: value for key, value in
                  (("account", args.account), ("qos", args.qos), ("constraint", args.constraint)) if value}
    additional.update(parse_key_values(args.slurm_extra))
    params: Dict[str, Any] = {
        "name": args.job_name or name,
        "nodes": args.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.timeout_min,
        "slurm_additional_parameters": additional,
    }
    if args.gpus_per_node:  # no --gpus-per-node=0: clusters without GPU gres reject it
        params["gpus_per_node"] = args.gpus_per_node
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    return params


# ---------------------------------------------------------------- the job submitted to SLURM

def master_port(job_id: str) -> int:
    """A port in [20000, 40000) derived from the job id: every task of a job (and its requeues) agrees on it."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 20000 + int(digits) % 20000


def _tasks_on_node(tasks_per_node: str, node: int) -> Optional[int]:
    """SLURM's compressed per-node task counts (``"2(x3),1"``) -> the count on ``node``; None if unparsable."""
    counts: List[int] = []
    for part in filter(None, tasks_per_node.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node] if 0 <= node < len(counts) else None


def slurm_rank_env(job_env: Any) -> Dict[str, str]:
    """torch.distributed's variables for one SLURM task, from submitit's ``JobEnvironment`` (SLURM's variables).

    RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, NODE_RANK = GROUP_RANK = SLURM_NODEID, WORLD_SIZE =
    SLURM_NTASKS, LOCAL_WORLD_SIZE = this node's entry of SLURM_STEP_TASKS_PER_NODE (or SLURM_TASKS_PER_NODE);
    MASTER_ADDR = the first host of SLURM_JOB_NODELIST (``scontrol show hostnames``), where rank 0 runs (SLURM
    gives task ids node by node); MASTER_PORT from the job id (:func:`master_port`), the same on every node and
    across requeues.
    """
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or ""
    local_world = _tasks_on_node(per_node, job_env.node) or max(1, job_env.num_tasks // max(1, job_env.num_nodes))
    return {
        "RANK": str(job_env.global_rank),
        "LOCAL_RANK": str(job_env.local_rank),
        "NODE_RANK": str(job_env.node),
        "GROUP_RANK": str(job_env.node),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": job_env.hostnames[0],
        "MASTER_PORT": str(master_port(job_env.job_id)),
    }


class TrainingJob:
    """The callable submitit runs in every SLURM task: set the torch.distributed env (:func:`slurm_rank_env`),
    print where the task runs, then ``fn(cfg)``. A collective that fails because another rank or host went away
    is re-raised as one clear error naming this rank, its host and the intact checkpoint
    (:func:`selfsup.distributed.collective_failure`).

    On preemption or timeout submitit calls :meth:`checkpoint`, which requeues the same job; ``fn`` resumes from
    ``cfg.output_dir``'s last checkpoint (a plain ``scontrol requeue`` reruns it the same way).
    """

    def __init__(self, fn: TrainFn, cfg: Any) -> None:
        self.fn = fn
        self.cfg = cfg

    def __call__(self) -> Any:
        import submitit

        env = submitit.JobEnvironment()
        _reset_signals_in_forked_children()
        os.environ.update(slurm_rank_env(env))
        print(f"task {env.global_rank}/{env.num_tasks} (node {env.node}, local rank {env.local_rank}) on "
              f"{socket.gethostname()}: rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
        try:
            return self.fn(self.cfg)
        except Exception as err:
            from selfsup.distributed import collective_failure

            failure = collective_failure(err, self.cfg.output_dir)
            if failure is None:
                raise
            raise failure from err

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        # the training fn saves its own checkpoints; requeue the same call and let it resume from output_dir
        logger.warning("preempted or timed out: requeuing; the run resumes from %s", self.cfg.output_dir)
        print(f"TrainingJob.checkpoint: requeuing, resume from {self.cfg.output_dir}", flush=True)
        return submitit.helpers.DelayedSubmission(TrainingJob(self.fn, self.cfg))


_FORK_HOOK_INSTALLED = []


def _reset_signals_in_forked_children() -> None:
    """Forked helpers (data loader workers, multiprocessing pools) must not inherit submitit's handlers.

    submitit ignores SIGTERM in the job process (it waits for the preemption signal instead); a forked pool
    worker inheriting that ignores ``Pool.terminate()`` and its parent hangs forever in ``join()``.
    Children get SIGTERM back to default and ignore the preemption signal (the parent checkpoints and requeues).
    """
    if _FORK_HOOK_INSTALLED or not hasattr(os, "register_at_fork"):
        return
    import signal

    import submitit

    preempt = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG, signal.SIGUSR2)

    def reset() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCONT, signal.SIG_DFL)
        signal.signal(preempt, signal.SIG_IGN)

    os.register_at_fork(after_in_child=reset)
    _FORK_HOOK_INSTALLED.append(True)


def _import_root(module_name: str) -> Optional[str]:
    """The ``sys.path`` entry ``module_name`` was imported from, unless it is installed (site-packages/editable)."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file or module_name == "__main__":
        return None
    parts = module_name.split(".")
    for entry in sys.path:
        base = Path(entry or os.getcwd()).resolve()
        for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
            if candidate == Path(file).resolve():
                return None if "site-packages" in base.parts else str(base)
    return None


def submit_slurm(fn: TrainFn, cfgs: Sequence[Any], args: argparse.Namespace) -> List[Any]:
    """Submit one job per config (a job array when there are several); return the submitit jobs."""
    import submitit

    if shutil.which("sbatch") is None:
        raise RuntimeError("--slurm given but 'sbatch' is not on PATH: run on a SLURM login node")
    base = Path(cfgs[0].output_dir).parent if len(cfgs) > 1 else Path(cfgs[0].output_dir)
    job_dir = Path(args.job_dir) if args.job_dir else base / "slurm"
    executor = submitit.AutoExecutor(folder=str(job_dir), cluster="slurm")
    params = slurm_parameters(args, name=getattr(fn, "__name__", "train"))
    root = _import_root(getattr(fn, "__module__", ""))
    if root:  # fn lives in a module found through sys.path (not installed): the job must find it too
        params["slurm_setup"] = [f"export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if len(cfgs) > 1:
        params["slurm_array_parallelism"] = len(cfgs)
    executor.update_parameters(**params)
    if len(cfgs) == 1:
        jobs = [executor.submit(TrainingJob(fn, cfgs[0]))]
    else:
        with executor.batch():
            jobs = [executor.submit(TrainingJob(fn, cfg)) for cfg in cfgs]
    for job, cfg in zip(jobs, cfgs):
        print(f"submitted job {job.job_id}: output_dir {cfg.output_dir}\n"
              f"  stdout {job.paths.stdout}\n  stderr {job.paths.stderr}", flush=True)
    print(f"follow training with: tensorboard --logdir {base}", flush=True)
    return jobs


# ---------------------------------------------------------------- local runs

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_worker(local_rank: int, fn: TrainFn, cfg: Any, world_size: int, port: int, results: Any) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    result = fn(cfg)
    if local_rank == 0:
        results.put(result)


def run_local(fn: TrainFn, cfg: Any, *, nprocs: int = 1) -> Any:
    """Run ``fn(cfg)`` here: directly, or in ``nprocs`` spawned processes; return rank 0's result."""
    if nprocs <= 1:
        return fn(cfg)
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    context = mp.spawn(_local_worker, args=(fn, cfg, nprocs, free_port(), results), nprocs=nprocs, join=False)
    collected = []
    while not context.join(timeout=1):  # drain as we go: a full pipe would block rank 0 forever
        while not results.empty():
            collected.append(results.get())
    while not results.empty():
        collected.append(results.get())
    return collected[0] if collected else None


def launch(fn: TrainFn, make_cfg: MakeConfig, args: argparse.Namespace) -> Any:
    """Run ``fn`` on every config built by ``make_cfg`` (one per ``--sweep`` point) locally or on SLURM.

    ``make_cfg(extra_overrides)`` returns a config with an ``output_dir`` attribute. Returns fn's result (a list
    of results for a local sweep), or the submitit job (a list of jobs for a sweep) with ``--slurm``.
    """
    cfgs = build_configs(make_cfg, args.sweep)
    if args.slurm:
        jobs = submit_slurm(fn, cfgs, args)
        return jobs if args.sweep else jobs[0]
    if args.nodes > 1:
        raise ValueError("--nodes > 1 needs --slurm")
    results = [run_local(fn, cfg, nprocs=args.gpus) for cfg in cfgs]
    return results if args.sweep else results[0]


def user_error_types() -> Tuple[type, ...]:
    """The user-error exceptions: :func:`selfsup.cli.user_error_types` (kept here for older imports)."""
    from selfsup.cli import user_error_types as types

    return types()


def user_errors() -> contextlib.AbstractContextManager:
    """:func:`selfsup.cli.user_errors` (one line, no traceback; ``--debug``/``SCENESSL_DEBUG=1``: the traceback)."""
    from selfsup.cli import user_errors as errors

    return errors()
