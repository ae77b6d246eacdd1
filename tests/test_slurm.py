"""selfsup.launcher on a real local SLURM cluster (tests/slurm/cluster.sh, two hosts in network namespaces):
submission, 2-task DDP, requeue; cross-host MoCo and MTL training, equivalence, requeue and a dead host.

The cluster is started once per session (and stopped at the end if this session started it); when SLURM cannot
be installed or started here the tests skip with the reason.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfsup import launcher

HERE = Path(__file__).parent
CLUSTER = HERE / "slurm" / "cluster.sh"
sys.path.insert(0, str(HERE / "slurm"))
import toy_jobs  # noqa: E402

pytestmark = pytest.mark.slurm

FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


CLUSTER_INFO: dict = {}


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the local cluster (idempotent); stop it afterwards only if this session started it.

    cluster.sh starts two hosts in network namespaces; where namespaces cannot be made (exit 3) it starts one
    host instead: the one-host tests run, the two-host ones skip with the reason (``two_hosts``).
    """
    if not CLUSTER.exists() or os.name != "posix":
        pytest.skip("tests/slurm/cluster.sh needs a POSIX machine")
    conf = subprocess.run([str(CLUSTER), "env"], capture_output=True, text=True).stdout.split("=", 1)[1].strip()
    status = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True)
    already = status.returncode == 0
    proc = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode not in (0, 3):
        pytest.skip(f"local SLURM cluster unavailable (cluster.sh start exit {proc.returncode}): "
                    f"{proc.stderr.strip()[-800:]}")
    CLUSTER_INFO["hosts"] = subprocess.run([str(CLUSTER), "hosts"], capture_output=True, text=True).stdout.split()
    CLUSTER_INFO["one_host_reason"] = proc.stderr.strip()[-800:] if proc.returncode == 3 else None
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if not already:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def two_hosts(slurm_cluster):
    """The two host names of the two-host cluster; skips with the reason where it runs on one host."""
    if CLUSTER_INFO["one_host_reason"] is not None:
        pytest.skip(f"two-host SLURM tests need network namespaces: {CLUSTER_INFO['one_host_reason']}")
    if len(CLUSTER_INFO["hosts"]) != 2:
        pytest.skip(f"the running cluster has hosts {CLUSTER_INFO['hosts']}, not two (SCENESSL_SLURM_HOSTS=1?)")
    return CLUSTER_INFO["hosts"]


def slurm_args(*argv: str) -> argparse.Namespace:
    parser = launcher.add_launch_args(argparse.ArgumentParser())
    return parser.parse_args(["--slurm", "--cpus-per-task", "1", "--timeout-min", "30", *argv])


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip() or "GONE"


def job_logs(job) -> str:
    parts = []
    for path in sorted(Path(job.paths.folder).glob(f"{job.job_id}_*.out")) + sorted(
            Path(job.paths.folder).glob(f"{job.job_id}_*.err")):
        parts.append(f"---- {path.name}\n{path.read_text()[-3000:]}")
    return "\n".join(parts) or f"(no logs under {job.paths.folder})"


def wait_until(condition, job, *, timeout: float, what: str) -> None:
    """Poll ``condition()`` every 0.5 s; fail with the job's state and logs on timeout or job failure."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        state = job_state(job.job_id)
        if state in FAILED_STATES:
            pytest.fail(f"job {job.job_id} is {state} while waiting for {what}\n{job_logs(job)}")
        time.sleep(0.5)
    pytest.fail(f"job {job.job_id} ({job_state(job.job_id)}): no {what} after {timeout:.0f}s\n{job_logs(job)}")


def wait_done(job, timeout: float = 90):
    """Wait for every task's result pickle (sacct is off here, so submitit only learns from the files)."""
    wait_until(lambda: job.done(), job, timeout=timeout, what="result")
    try:
        return job.results()
    except Exception as err:  # noqa: BLE001 - report with the job's logs
        pytest.fail(f"job {job.job_id} failed: {err}\n{job_logs(job)}")


@pytest.mark.timeout(120)
def test_submit_tiny_training_job(slurm_cluster, tmp_path, capsys):
    job = launcher.launch(toy_jobs.train_loop, toy_jobs.make_cfg(str(tmp_path / "run"), ["steps=3"]), slurm_args())
    printed = capsys.readouterr().out
    assert f"submitted job {job.job_id}" in printed and "tensorboard --logdir" in printed
    assert str(job.paths.stdout) in printed and str(job.paths.stderr) in printed
    (result,) = wait_done(job)
    assert result["step"] == 3
    assert (tmp_path / "run" / "checkpoint.pth").is_file()
    assert list((tmp_path / "run").glob("events.out.tfevents.*")), "no TensorBoard events written"


@pytest.mark.timeout(120)
def test_two_tasks_gloo(slurm_cluster, tmp_path):
    job = launcher.launch(toy_jobs.report_ranks, toy_jobs.make_cfg(str(tmp_path)),
                          slurm_args("--tasks-per-node", "2"))
    results = wait_done(job)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["gathered"] == [0, 1] for r in results)
    masters = {r["master"] for r in results}  # both tasks on one node (either host of the two-host cluster)
    hosts = CLUSTER_INFO["hosts"]
    assert len(masters) == 1 and masters.pop() in {f"{h}:{launcher.master_port(job.job_id)}" for h in hosts}
    assert (tmp_path / "rank0.json").is_file() and (tmp_path / "rank1.json").is_file()


@pytest.mark.timeout(150)
def test_requeue_resumes_from_checkpoint(slurm_cluster, tmp_path):
    steps = ["steps=14", "sleep_s=0.7"]
    reference = toy_jobs.train_loop(toy_jobs.make_cfg(str(tmp_path / "reference"), ["steps=14"])([]))
    run = tmp_path / "requeued"
    log = run / "train_log.txt"
    job = launcher.launch(toy_jobs.train_loop, toy_jobs.make_cfg(str(run), steps), slurm_args())

    def steps_done() -> int:
        done = re.findall(r"step (\d+)/", log.read_text()) if log.exists() else []
        return int(done[-1]) if done else 0

    def resumes() -> list:
        return [int(s) for s in re.findall(r"resumed from step (\d+)", log.read_text())] if log.exists() else []

    # 1) preemption: submitit's signal (USR2) -> TrainingJob.checkpoint() -> submitit requeues the job
    wait_until(lambda: steps_done() >= 2, job, timeout=60, what="2 training steps")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    wait_until(lambda: len(resumes()) >= 1, job, timeout=60, what="resume after USR2 preemption")
    assert "TrainingJob.checkpoint: requeuing" in job_logs(job)
    # 2) plain requeue by the admin: the job is killed and rerun from the start; it resumes from output_dir
    first_resume = resumes()[0]
    wait_until(lambda: steps_done() >= first_resume + 2, job, timeout=60, what="steps after the first resume")
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    wait_until(lambda: len(resumes()) >= 2, job, timeout=60, what="resume after scontrol requeue")

    (result,) = wait_done(job, timeout=60)
    assert all(step > 0 for step in resumes()), resumes()
    assert resumes()[1] > first_resume
    assert result == reference
    assert json.loads((run / "final.json").read_text()) == reference


@pytest.mark.timeout(150)
def test_pretrain_entry_point_on_slurm(slurm_cluster, embedded_root, tmp_path):
    """launch/pretrain.py --slurm: a tiny 2-process MoCo run writes its checkpoint and TensorBoard events.

    ``embedded_root`` generates the embedded data once here; the job inherits SCENESSL_DATA and reuses it.
    """
    import submitit

    repo = HERE.parent
    out = tmp_path / "pretrain"
    cmd = [sys.executable, str(repo / "launch" / "pretrain.py"), "--slurm", "--tasks-per-node", "2",
           "--cpus-per-task", "1", "--timeout-min", "30", "--output-dir", str(out),
           "--epochs", "1", "--arch", "resnet_tiny", "--batch-size", "16", "--workers", "0",
           "model.hidden_dim=64", "moco.queue_size=64", "train.steps_per_epoch=2", "augment.large_size=32",
           "data.knn_monitor=none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=120)
    assert proc.returncode == 0, f"submission failed:\n{proc.stdout}\n{proc.stderr}"
    match = re.search(r"submitted job (\S+):", proc.stdout)
    assert match, proc.stdout
    job = submitit.SlurmJob(folder=out / "slurm", job_id=match.group(1), tasks=(0, 1))
    wait_done(job, timeout=120)
    assert (out / "checkpoint.pth").is_file(), sorted(p.name for p in out.iterdir())
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events in the run directory"
    assert (out / "log_rank1.txt").is_file(), "rank 1 did not run"
