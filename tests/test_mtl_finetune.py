"""Smoke runs of downstream/finetune_mtl.py on the embedded NYUD-format data (real files on disk)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_mtl_yaml
from selfsup.backbones import build_backbone

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "downstream" / "finetune_mtl.py"
TINY = tiny_mtl_yaml()


def _config(tmp_path) -> Path:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    return config


def _args(tmp_path, embedded_root, *args):
    return ["--config", str(_config(tmp_path)), "--data-root", str(embedded_root / "nyud"), *args]


def test_finetune_script_subprocess_mti_net_with_delta(tmp_path, embedded_root):
    """The real entry point: MTI-Net + auxiliary tasks, torchvision-style --weights, Δ_MTL from stored results."""
    st = tmp_path / "nyud_st.json"
    st.write_text(json.dumps({"semseg": {"miou": 10.0}, "depth": {"rmse": 2.0}}))
    weights = tmp_path / "backbone.pth"
    torch.save(build_backbone("resnet_tiny").state_dict(), weights)
    out = tmp_path / "mti"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(SCRIPT), *_args(tmp_path, embedded_root, "--output-dir", str(out), "--single-task-results",
                                               str(st), "--weights", str(weights), "data.auxiliary_tasks=[normals,edge]")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["arch"] == "mti_net" and results["tasks"] == ["semseg", "depth"]
    assert results["auxiliary_tasks"] == ["normals", "edge"]
    assert {"miou"} <= set(results["metrics"]["semseg"]) and {"rmse", "abs_rel"} <= set(results["metrics"]["depth"])
    assert isinstance(results["delta_mtl"], float)
    for name in ("config.yaml", "checkpoint.pth", "model_report.json", "log_rank0.txt"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    # the depth outputs (4 initial scales + final) started at the training images' mean depth
    assert "in 5 prediction layer(s) (model.depth_init=train_mean)" in (out / "log_rank0.txt").read_text()


def test_single_task_runs_record_results_and_resume(tmp_path, embedded_root):
    from downstream.finetune_mtl import main

    st = tmp_path / "st.json"
    out = tmp_path / "st_edge"
    args = _args(tmp_path, embedded_root, "--output-dir", str(out), "--single-task-results", str(st),
                 "model.arch=single_task", "data.tasks=[edge]", "eval.edge_thresholds=5")
    first = main(args)
    assert set(json.loads(st.read_text())) == {"edge"} and "odsf" in first["metrics"]["edge"]
    assert first["delta_mtl"] is None
    again = main(args)  # finished run: resumes from its checkpoint, trains nothing, evaluates the same weights
    assert again["metrics"] == first["metrics"]
    assert "resumed from" in (out / "log_rank0.txt").read_text()


def test_mtl_run_without_single_task_results_fails_early(tmp_path, embedded_root):
    from downstream.finetune_mtl import main
    from downstream.mtl.delta import MissingSingleTaskResults

    with pytest.raises(MissingSingleTaskResults, match="does not exist"):
        main(_args(tmp_path, embedded_root, "--output-dir", str(tmp_path / "run"), "--single-task-results",
                   str(tmp_path / "missing.json"), "model.arch=mtl_baseline"))
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_unknown_config_key_is_rejected(tmp_path, embedded_root):
    from downstream.finetune_mtl import main

    with pytest.raises(SystemExit, match="error: .*no_such_key"):  # one clear line, no traceback
        main(_args(tmp_path, embedded_root, "--output-dir", str(tmp_path / "run"), "model.no_such_key=1"))


def test_mean_train_depth_is_the_mean_of_valid_pixels(embedded_root):
    import numpy as np

    from downstream.mtl.config import DataConfig
    from downstream.mtl.data import mean_train_depth

    root = embedded_root / "nyud"
    ids = (root / "gt_sets" / "train.txt").read_text().split()[:6]
    depths = [np.load(root / "depth" / f"{i}.npy") for i in ids]
    expected = np.concatenate([d[d > 0] for d in depths]).astype(np.float64).mean()
    got = mean_train_depth(DataConfig(root=str(root), max_train_images=6), max_images=64)
    assert got == pytest.approx(expected, rel=1e-6)
    assert 0.5 < got < 9.0  # indoor range of the embedded scenes


def test_bad_depth_init_is_rejected(tmp_path, embedded_root):
    from downstream.finetune_mtl import main

    with pytest.raises(SystemExit, match="model.depth_init='deep'"):
        main(_args(tmp_path, embedded_root, "--output-dir", str(tmp_path / "run"), "model.depth_init=deep"))


@pytest.mark.parametrize("arch", ["astmt", "cross_stitch", "nddr", "mtan"])
def test_new_architectures_train_and_resume(tmp_path, embedded_root, arch):
    """One step of each through the entry point (ASTMT: discriminator term logged; cross-stitch: branches from
    single-task checkpoints over --weights), then a rerun resumes and evaluates the same weights."""
    from downstream.finetune_mtl import main
    from downstream.mtl.models import build_model
    from downstream.mtl.tasks import TaskSet

    weights = tmp_path / "backbone.pth"
    torch.save(build_backbone("resnet_tiny").state_dict(), weights)
    extra = []
    if arch == "cross_stitch":
        for task in ("semseg", "depth"):
            net = build_model("single_task", tasks=TaskSet("nyud", (task,)), backbone="resnet_tiny", fpn_channels=16,
                              head_channels=16)
            torch.save({"arch": "single_task", "model": net.state_dict()}, tmp_path / f"{task}.pth")
            extra.append(f"model.task_checkpoints.{task}={tmp_path / f'{task}.pth'}")
    out = tmp_path / arch
    args = _args(tmp_path, embedded_root, "--output-dir", str(out), "--weights", str(weights), f"model.arch={arch}",
                 "max_iters_per_epoch=1", "data.batch_size=2", "data.max_train_images=2", "data.max_val_images=2",
                 "data.crop_size=[32,32]", "model.output_stride=16", "log_every=1", *extra)
    first = main(args)
    assert first["arch"] == arch and set(first["metrics"]) == {"semseg", "depth"}
    again = main(args)
    assert again["metrics"] == first["metrics"]
    log = (out / "log_rank0.txt").read_text()
    assert "resumed from" in log
    if arch == "cross_stitch":
        assert "task branches from single-task checkpoints" in log
