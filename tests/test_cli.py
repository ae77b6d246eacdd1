"""One CLI family (selfsup.cli): every entry point's shared options, key=value, config.yaml, one-line user errors,
--debug, deprecated aliases, and --slurm on the evaluations.

The entry points are the scripts in launch/ and downstream/ that define ``main``: a new one is covered by being
added (and fails these tests until it uses the shared parser, or is listed in NO_SHARED_PARSER with the reason).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, entry_module, run_env
from selfsup import cli
from selfsup import config as config_mod
from selfsup.config import load_config

ENTRY_POINTS = sorted(str(p.relative_to(REPO)) for folder in ("launch", "downstream") for p in (REPO / folder).glob("*.py")
                      if "def main" in p.read_text())

# entry points outside the family, with the reason
NO_SHARED_PARSER = {
    "launch/gpu_report.py": "the table of launch/gpu_check.sh: reads that script's JSON files, no config of its own",
    "downstream/bench_balancers.py": "subcommands (overhead, compare) whose key=value are the MTLConfig overrides of "
                                     "every run; they share --debug and the one-line errors only",
}
# entry points that neither train nor evaluate: no launcher flags
NO_LAUNCH = {"launch/export.py", "launch/make_data.py", "launch/bench_pretrain.py", "downstream/bench_mtl.py",
             "downstream/branch.py"}
NO_BACKBONE = {"launch/export.py", "launch/make_data.py", "launch/demo.py", "downstream/branch.py",
               "launch/bench_recipe.py"}
NO_WEIGHTS = {"launch/pretrain.py", "launch/make_data.py", "launch/bench_pretrain.py", "downstream/bench_mtl.py",
              "downstream/branch.py", "launch/bench_recipe.py"}  # bench_recipe pretrains every arm itself
SHARED = ["key=value", "--config", "--output-dir", "--debug"]
LAUNCH = ["--slurm", "--nodes", "--gpus-per-node", "--partition", "--sweep"]
# the smallest argv that reaches the config (default: none)
MINIMAL_ARGV = {"launch/export.py": ["--weights", "x.pth", "--format", "torchvision"],
                "downstream/bench_balancers.py": ["overhead"]}


_module = entry_module


def _help(entry: str) -> str:
    out = io.StringIO()
    argv, sys.argv = sys.argv, [entry, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
            runpy.run_path(str(REPO / entry), run_name="__main__")
    finally:
        sys.argv = argv
    assert exc.value.code == 0, (entry, exc.value.code)
    return out.getvalue()


def test_entry_points_are_found():
    assert {"launch/pretrain.py", "downstream/finetune_mtl.py", "downstream/segment_retrieval.py"} <= set(ENTRY_POINTS)
    assert set(NO_SHARED_PARSER) | NO_LAUNCH <= set(ENTRY_POINTS)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_shows_the_shared_options(entry):
    if entry in NO_SHARED_PARSER:
        pytest.skip(NO_SHARED_PARSER[entry])
    text = _help(entry)
    expected = SHARED + ([] if entry in NO_LAUNCH else LAUNCH) + ([] if entry in NO_WEIGHTS else ["--weights"]) + \
        ([] if entry in NO_BACKBONE else ["--backbone"])
    assert cli.SHARED_GROUP in text, entry
    missing = [opt for opt in expected if opt not in text]
    assert not missing, (entry, missing)
    assert "--arch" not in text  # the former spelling is a hidden alias


@pytest.mark.timeout(120)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unknown_key_is_a_one_line_error_naming_it(entry, tmp_path, monkeypatch):
    if entry == "launch/gpu_report.py":
        pytest.skip(NO_SHARED_PARSER[entry])
    if entry == "downstream/branch.py":  # its config is the affinity file's: make a tiny one
        argv = ["--affinity", str(_affinity_file(tmp_path)), "--budget-params", "1e9"]
    else:
        argv = MINIMAL_ARGV.get(entry, [])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        _module(entry).main(argv + ["--output-dir", str(tmp_path / "out")] * (entry not in NO_SHARED_PARSER and
                                                                              entry != "downstream/branch.py")
                            + ["no_such_key=1"])
    message = str(exc.value.code)
    assert message.startswith("error: ") and "'no_such_key'" in message and "\n" not in message, (entry, message)
    assert not (tmp_path / "out").exists(), entry  # rejected before anything is written


def _affinity_file(tmp_path: Path) -> Path:
    import numpy as np

    from downstream.mtl.branch_plan import save_affinity
    from downstream.mtl.config import MTLConfig

    cfg = load_config(MTLConfig, overrides=["data.tasks=[semseg,depth]", "model.backbone=resnet_tiny"])
    result = {"affinity": np.ones((2, 2, 2)), "tasks": ["semseg", "depth"], "branch_points": [3, 4],
              "method": "rsa", "num_images": 4}
    save_affinity(tmp_path / "affinity.npz", result, cfg)
    return tmp_path / "affinity.npz"


def test_key_value_sets_typed_keys_anywhere_on_the_command_line():
    from downstream import segment_retrieval as retrieval

    args = cli.parse(retrieval.build_parser(), ["retrieval.clusters=7", "--weights", "none", "data.max_images=3",
                                                "--backbone", "resnet_tiny", "retrieval.kmeans_seed=4"])
    cfg = retrieval.make_config(args)
    assert (cfg.retrieval.clusters, cfg.retrieval.kmeans_seed, cfg.data.max_images) == (7, 4, 3)
    assert cfg.model.backbone == "resnet_tiny" and cfg.output_dir == "runs/retrieval/resnet_tiny"
    with pytest.raises(config_mod.ConfigError, match=r"retrieval.clusters: expected int, got str 'many'"):
        retrieval.make_config(cli.parse(retrieval.build_parser(), ["--weights", "none", "retrieval.clusters=many"]))
    from downstream import bench_mtl  # a tool: its flags are its config keys
    args = bench_mtl.parse_args(["steps=3", "--height", "32", "neck=none"])
    assert (args.steps, args.height, args.neck) == (3, 32, "none")


def _tiny_checkpoint(path: Path) -> Path:
    from selfsup import checkpoint as ckpt
    from selfsup.backbones import build_backbone

    model = build_backbone("resnet_tiny")
    ckpt.save_checkpoint({"epoch": 1, "arch": "resnet_tiny",
                          "model": {f"encoder_q.backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.mark.timeout(180)
def test_config_yaml_lands_in_the_output_dir(tmp_path, embedded_root, capsys):
    """Real tiny runs: export, segment retrieval, DAVIS evaluation, data generation; the config reads back."""
    from downstream import davis_propagation as davis
    from downstream import segment_retrieval as retrieval

    export = _module("launch/export.py")
    weights = _tiny_checkpoint(tmp_path / "checkpoint.pth")
    export.main(["--weights", str(weights), "--format", "torchvision", "--output-dir", str(tmp_path / "exp")])
    assert (tmp_path / "exp" / "backbone_torchvision.pth").is_file()
    cfg = load_config(export.ExportConfig, yaml_path=tmp_path / "exp" / "config.yaml")
    assert cfg.weights == str(weights) and cfg.format == "torchvision"
    # into a folder that holds another run's config.yaml: that one is kept
    (tmp_path / "config.yaml").write_text("model: {backbone: resnet_tiny}\n")
    export.main(["--weights", str(weights), "--format", "detectron2", "--out", str(tmp_path / "b.pkl")])
    assert (tmp_path / "config.yaml").read_text() == "model: {backbone: resnet_tiny}\n"
    assert load_config(export.ExportConfig, yaml_path=tmp_path / "config.export.yaml").format == "detectron2"

    out = tmp_path / "retrieval"
    retrieval.main(["--weights", str(tmp_path / "exp" / "backbone_torchvision.pth"), "--backbone", "resnet_tiny",
                    "data.max_images=2", "figure=false", "--output-dir", str(out)])
    assert json.loads((out / "results.json").read_text())["images"] == 4
    assert load_config(retrieval.RetrievalConfig, yaml_path=out / "config.yaml").data.max_images == 2

    gt = tmp_path / "gt"  # DAVIS evaluation of the ground truth as predictions (no backbone)
    sequences = (embedded_root / "davis2017" / "ImageSets" / "2017" / "val.txt").read_text().split()[:1]
    shutil.copytree(embedded_root / "davis2017", tmp_path / "davis2017", ignore=shutil.ignore_patterns("JPEGImages"))
    (tmp_path / "davis2017" / "JPEGImages").symlink_to(embedded_root / "davis2017" / "JPEGImages")
    (tmp_path / "davis2017" / "ImageSets" / "2017" / "one.txt").write_text(sequences[0] + "\n")
    shutil.copytree(embedded_root / "davis2017" / "Annotations" / "480p" / sequences[0], gt / sequences[0])
    davis.main(["--eval-only", str(gt), "--data-root", str(tmp_path / "davis2017"), "data.split=one"])
    assert json.loads((gt / "results.json").read_text())["J&F-Mean"] == pytest.approx(100.0)
    cfg = load_config(davis.DavisConfig, yaml_path=gt / "config.yaml")
    assert cfg.eval_only and cfg.data.split == "one" and cfg.output_dir == str(gt)


def test_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    """run_main (what ``python script.py`` runs): SystemExit('error: <one line>'), which Python prints to stderr with
    exit status 1; --debug or SCENESSL_DEBUG=1: the exception itself, with its traceback."""
    from downstream import segment_retrieval as retrieval

    missing = tmp_path / "missing.pth"
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.run_main(retrieval.main, ["--weights", str(missing)])
    assert exc.value.code == (f"error: model.weights={missing}: not found (expected a checkpoint or an exported "
                              f"backbone file)")
    with pytest.raises(FileNotFoundError, match="missing.pth: not found"):
        cli.run_main(retrieval.main, ["--weights", str(missing), "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError, match="missing.pth: not found"):
        cli.run_main(retrieval.main, ["--weights", str(missing)])
    with pytest.raises(FileNotFoundError):  # also an error raised before main parsed --debug
        with cli.user_errors(argv=[]):
            raise FileNotFoundError("x")


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        with cli.user_errors(debug=False):
            1 / 0
    with pytest.raises(SystemExit, match=r"^error: config key x: bad$"):
        with cli.user_errors(debug=False):
            raise config_mod.ConfigError("config key x:\n bad")


def _deprecated_actions(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if hasattr(a, "new_spelling")]


@pytest.mark.parametrize("entry, old, value, dest, new", [
    ("launch/pretrain.py", "--arch", "resnet18", "backbone", "--backbone"),
    ("downstream/finetune_mtl.py", "--arch", "resnet18", "backbone", "--backbone"),
    ("downstream/segment_retrieval.py", "--seed", "3", "kmeans_seed", "--kmeans-seed (retrieval.kmeans_seed)"),
    ("downstream/linear_probe.py", "--root", "/data", "data_root", "--data-root"),
    ("downstream/linear_probe.py", "--out", "r.json", "out", "--output-dir (results.json)"),
    ("launch/make_data.py", "--out", "d", "output_dir", "--output-dir"),
])
def test_deprecated_flag_warns_once_naming_the_new_spelling(entry, old, value, dest, new, capsys, monkeypatch):
    monkeypatch.setattr(config_mod, "_WARNED", set())
    parser = _module(entry).build_parser()
    args = cli.parse(parser, [old, value])
    assert str(getattr(args, dest)) == value
    err = capsys.readouterr().err.strip()
    assert err == f"warning: {old} is deprecated and will be removed in the next release; use {new}"


def test_every_deprecated_alias_is_listed_in_the_docs():
    docs = (REPO / "README.md").read_text()
    for entry in ENTRY_POINTS:
        if entry in NO_SHARED_PARSER:
            continue
        for action in _deprecated_actions(_module(entry).build_parser()):
            for flag in action.option_strings:
                assert f"`{flag}`" in docs, (entry, flag)


def test_former_config_keys_warn_and_map(capsys, monkeypatch):
    from selfsup.moco.config import PretrainConfig

    monkeypatch.setattr(config_mod, "_WARNED", set())
    cfg = load_config(PretrainConfig, overrides=["model.arch=resnet18"])
    assert cfg.model.backbone == "resnet18"
    assert "config key 'model.arch' is deprecated" in capsys.readouterr().err
    with pytest.raises(config_mod.ConfigError, match="give one"):
        load_config(PretrainConfig, overrides=["model.arch=resnet18", "model.backbone=resnet50"])
    old = {"model": {"arch": "resnet18", "dim": 8}, "output_dir": "x"}  # an older checkpoint's stored config
    assert config_mod.upgrade_keys(PretrainConfig, old) == {"model": {"backbone": "resnet18", "dim": 8}, "output_dir": "x"}


def test_launch_flags_that_cannot_work_are_one_line_errors(monkeypatch):
    from downstream import davis_propagation as davis

    with pytest.raises(SystemExit, match=r"^error: --nodes > 1 needs --slurm$"):
        davis.main(["--weights", "none", "--nodes", "2"])
    with pytest.raises(SystemExit, match=r"^error: this evaluation runs in one process"):
        davis.main(["--weights", "none", "--gpus", "2"])
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SystemExit, match=r"^error: --slurm given but 'sbatch' is not on PATH"):
        davis.main(["--weights", "none", "--slurm"])


@pytest.mark.timeout(120)
def test_slurm_flag_on_an_evaluation_goes_through_the_launcher(tmp_path, embedded_root, monkeypatch):
    """segment_retrieval.py --slurm --sweep: the launcher's submission path end to end, with submitit's 'debug'
    executor (the same job objects, run in this process) standing in for sbatch, which the non-slurm suite lacks
    (the real cluster: test_retrieval_on_the_local_slurm_cluster). The sbatch check and the executor's cluster
    are the only parts replaced."""
    import submitit

    from downstream import segment_retrieval as retrieval
    from selfsup import launcher

    real = submitit.AutoExecutor
    made = []

    def debug_executor(folder, cluster=None, **kwargs):
        made.append((folder, cluster))
        return real(folder=folder, cluster="debug", **kwargs)

    monkeypatch.setattr(submitit, "AutoExecutor", debug_executor)
    monkeypatch.setattr(cli.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(launcher.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(launcher, "_FORK_HOOK_INSTALLED", [True])  # no fork hook in the test process
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "0")  # TrainingJob sets them: restored afterwards
    out = tmp_path / "ret"
    jobs = retrieval.main(["--slurm", "--weights", "none", "--backbone", "resnet_tiny", "--output-dir", str(out),
                           "data.max_images=2", "figure=false", "--sweep", "retrieval.kmeans_seed=0,1",
                           "--partition", "p", "--gpus-per-node", "1"])
    results = [job.result() for job in jobs]
    assert made == [(str(out / "slurm"), "slurm")]
    assert len(results) == 2 and all(r["images"] == 4 for r in results)
    for seed in (0, 1):
        run = out / f"retrieval.kmeans_seed={seed}"
        assert load_config(retrieval.RetrievalConfig, yaml_path=run / "config.yaml").retrieval.kmeans_seed == seed
        assert (run / "results.json").is_file()
