"""selfsup.launcher without SLURM: local multi-process runs, sweeps, sbatch parameters."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from selfsup import launcher

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
import toy_jobs  # noqa: E402


def environment_of(cfg) -> dict:
    return dict(os.environ)


def parse(*argv: str) -> argparse.Namespace:
    return launcher.add_launch_args(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.mark.timeout(120)
def test_local_two_processes_gloo(tmp_path):
    result = launcher.launch(toy_jobs.report_ranks, toy_jobs.make_cfg(str(tmp_path)), parse("--gpus", "2"))
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(i["rank"] for i in infos) == [0, 1]
    assert all(i["world_size"] == 2 and i["env_rank"] == i["rank"] == i["local_rank"] for i in infos)
    assert all(i["gathered"] == [0, 1] for i in infos)
    assert result["rank"] == 0 and result["world_size"] == 2


@pytest.mark.timeout(60)
def test_local_single_process_returns_result(tmp_path):
    result = launcher.launch(toy_jobs.train_loop, toy_jobs.make_cfg(str(tmp_path), ["steps=2"]), parse())
    assert result["step"] == 2
    assert (tmp_path / "checkpoint.pth").is_file() and list(tmp_path.glob("events.out.tfevents.*"))


def test_sweep_expansion_builds_configs(tmp_path):
    cfgs = launcher.build_configs(toy_jobs.make_cfg(str(tmp_path)), ["lr=0.1,0.3", "seed=1,2"])
    assert [(c.lr, c.seed) for c in cfgs] == [(0.1, 1), (0.1, 2), (0.3, 1), (0.3, 2)]
    assert [Path(c.output_dir) for c in cfgs] == [
        tmp_path / "lr=0.1,seed=1", tmp_path / "lr=0.1,seed=2", tmp_path / "lr=0.3,seed=1", tmp_path / "lr=0.3,seed=2"]
    assert launcher.expand_sweep([]) == [("", [])]
    only = launcher.build_configs(toy_jobs.make_cfg(str(tmp_path)), [])
    assert len(only) == 1 and only[0].output_dir == str(tmp_path)
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        launcher.expand_sweep(["lr"])


def test_local_sweep_runs_each_value(tmp_path):
    results = launcher.launch(toy_jobs.report_ranks, toy_jobs.make_cfg(str(tmp_path)), parse("--sweep", "lr=0.5,2"))
    assert [r["lr"] for r in results] == [0.5, 2.0]
    assert (tmp_path / "lr=0.5" / "rank0.json").is_file() and (tmp_path / "lr=2" / "rank0.json").is_file()


def test_slurm_parameters_map_extra_args():
    args = parse("--slurm", "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "10", "--partition", "learn",
                 "--timeout-min", "60", "--account", "proj", "--qos", "high", "--constraint", "volta32gb",
                 "--slurm-extra", "comment=ablation", "--slurm-extra", "exclusive", "--mem-gb", "400")
    params = launcher.slurm_parameters(args, name="pretrain")
    assert params == {
        "name": "pretrain", "nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 10,
        "timeout_min": 60, "slurm_partition": "learn", "mem_gb": 400.0,
        "slurm_additional_parameters": {"account": "proj", "qos": "high", "constraint": "volta32gb",
                                        "comment": "ablation", "exclusive": True},
    }
    cpu = launcher.slurm_parameters(parse("--slurm", "--tasks-per-node", "2"))
    assert cpu["tasks_per_node"] == 2 and "gpus_per_node" not in cpu and cpu["slurm_additional_parameters"] == {}
    assert launcher.slurm_parameters(parse("--slurm"))["tasks_per_node"] == 1


def test_training_job_sets_distributed_env(monkeypatch, tmp_path):
    import submitit

    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
           "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[7-8]",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "NODE_RANK",
                "GROUP_RANK"):
        monkeypatch.setenv(key, "unset")  # recorded, so the job's os.environ.update is undone after the test
        monkeypatch.delenv(key)
    job = launcher.TrainingJob(environment_of, SimpleNamespace(output_dir=str(tmp_path)))
    seen = job()
    assert (seen["RANK"], seen["LOCAL_RANK"], seen["WORLD_SIZE"]) == ("3", "1", "4")
    assert (seen["NODE_RANK"], seen["GROUP_RANK"], seen["LOCAL_WORLD_SIZE"]) == ("1", "1", "2")
    assert seen["MASTER_ADDR"] == "node7" and seen["MASTER_PORT"] == str(launcher.master_port("4242"))
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and isinstance(delayed.function,
                                                                                  launcher.TrainingJob)


def test_import_root_finds_sys_path_modules():
    assert launcher._import_root("toy_jobs") == str((Path(__file__).parent / "slurm").resolve())
    assert launcher._import_root("selfsup.launcher") is None  # installed (editable): found anywhere


def test_tasks_per_node_parsing():
    assert [launcher._tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    assert launcher._tasks_on_node("8", 0) == 8 and launcher._tasks_on_node("8", 1) is None
    assert launcher._tasks_on_node("garbage", 0) is None


def test_rendezvous_checks_fail_in_one_line(monkeypatch):
    """Real name resolution: a master name that does not resolve, and gloo across hosts from a host whose name
    resolves to loopback only (here: the name 'localhost'), fail before any waiting; GLOO_SOCKET_IFNAME lifts
    the second."""
    import socket

    from selfsup import distributed

    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    with pytest.raises(RuntimeError, match=r"MASTER_ADDR=no-such-host.invalid .*does not resolve"):
        distributed.check_rendezvous(backend="gloo", world_size=2, local_world_size=1)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    distributed.check_rendezvous(backend="gloo", world_size=2, local_world_size=2)  # one host: loopback is fine
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")  # this host's name: one that is loopback
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    with pytest.raises(RuntimeError, match=r"localhost resolves to 127\.0\.0\.1.*GLOO_SOCKET_IFNAME"):
        distributed.check_rendezvous(backend="gloo", world_size=2, local_world_size=1)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    distributed.check_rendezvous(backend="gloo", world_size=2, local_world_size=1)


def test_collective_timeout_and_failure_message(monkeypatch, tmp_path):
    from selfsup import distributed

    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.collective_timeout().total_seconds() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "20")
    assert distributed.collective_timeout().total_seconds() == 20
    for bad in ("soon", "0"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="SCENESSL_COLLECTIVE_TIMEOUT"):
            distributed.collective_timeout()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "20")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [169.254.77.12]:4242")
    message = str(distributed.collective_failure(gloo, tmp_path))
    assert message.startswith("rank 0/2 on ") and "a collective failed ([../gloo" in message
    assert f"the last checkpoint in {tmp_path} is intact" in message and "wait limit 20 s" in message
    assert distributed.collective_failure(RuntimeError("Application timeout caused pair closure"), tmp_path)
    assert distributed.collective_failure(ValueError("bad config"), tmp_path) is None
    assert distributed.collective_failure(RuntimeError("CUDA out of memory"), tmp_path) is None
