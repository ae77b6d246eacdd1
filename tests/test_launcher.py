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
           "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[7-8]"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "unset")  # recorded, so the job's os.environ.update is undone after the test
        monkeypatch.delenv(key)
    job = launcher.TrainingJob(environment_of, SimpleNamespace(output_dir=str(tmp_path)))
    seen = job()
    assert (seen["RANK"], seen["LOCAL_RANK"], seen["WORLD_SIZE"]) == ("3", "1", "4")
    assert seen["MASTER_ADDR"] == "node7" and seen["MASTER_PORT"] == str(launcher.master_port("4242"))
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and isinstance(delayed.function,
                                                                                  launcher.TrainingJob)


def test_import_root_finds_sys_path_modules():
    assert launcher._import_root("toy_jobs") == str((Path(__file__).parent / "slurm").resolve())
    assert launcher._import_root("selfsup.launcher") is None  # installed (editable): found anywhere
