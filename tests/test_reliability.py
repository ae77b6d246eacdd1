"""Reliability: what holds under kill -9, concurrent runs, changed configs, corrupt input and bad checkpoints.

Each test here was written against a defect found by trying to break the toolkit (issue 13); docs/reliability.md
lists the guarantees and the test that proves each.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PYTHON, REPO, TINY_PRETRAIN, run_env
from selfsup import checkpoint as ckpt
from selfsup.config import ConfigError, load_config, parse_overrides
from selfsup.moco.config import PretrainConfig

pytestmark = pytest.mark.timeout(120)

PRETRAIN = ["model.backbone=resnet_tiny", "model.hidden_dim=16", "model.dim=8", "augment.large_size=32",
            "augment.small_size=16", "optim.batch_size=8", "moco.queue_size=32", "data.num_workers=0",
            "data.knn_monitor=none", "train.epochs=1", "train.steps_per_epoch=1"]


def write_images(folder, n=8, size=40):
    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def pretrain_main(run, *args, images=None):
    """launch/pretrain.py's main() in this process on 8 tiny images (its one-line errors arrive as SystemExit)."""
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import pretrain
    finally:
        sys.path.remove(str(REPO / "launch"))
    images = write_images(images or run.parent / "images")
    return pretrain.main(["--data", str(images), *PRETRAIN, "--output-dir", str(run), *args])


# ---------------------------------------------------------------- 1. one run per output dir

def test_second_run_on_a_locked_dir_fails_at_once_naming_pid_and_host(tmp_path):
    """A live holder (another process) blocks a second run at once: one line with its pid and host."""
    from selfsup.rundir import open_run_dir
    holder_code = ("import fcntl, os, socket, sys, time; os.mkdir(sys.argv[1]); f = open(sys.argv[1] + '/.lock', 'w'); "
                   "fcntl.flock(f, fcntl.LOCK_EX); f.write(f'pid {os.getpid()} on host {socket.gethostname()}'); "
                   "f.flush(); print('locked', flush=True); time.sleep(60)")  # what a running training holds
    holder = subprocess.Popen([PYTHON, "-c", holder_code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env=run_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"error: output_dir=.* is in use by another run \(pid {holder.pid} "
                                             rf"on host {os.uname().nodename}"):
            pretrain_main(tmp_path / "run")
        assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9): the kernel dropped its lock, and the next run takes the dir over
    with open_run_dir(tmp_path / "run", {}, harmless=()):
        assert f"pid {os.getpid()} " in (tmp_path / "run" / ".lock").read_text()


# ---------------------------------------------------------------- 2. resume only under the same config

def _tiny_checkpoint(run, **config):
    cfg = load_config(PretrainConfig, overrides=TINY_PRETRAIN + [f"output_dir={run}"] + [f"{k}={v}" for k, v in config.items()])
    from selfsup.config import to_dict
    ckpt.save_checkpoint({"config": to_dict(cfg), "global_step": 1}, run / "checkpoint.pth")
    return cfg


def test_resume_with_a_changed_config_is_refused_before_writing(tmp_path):
    """The probe's three cases: another batch size, another data folder, another arch (+ lr): one error listing
    each key with old and new value; config.yaml and the log stay as they were."""
    run = tmp_path / "run"
    pretrain_main(run)
    config, log = (run / "config.yaml").read_text(), (run / "log_rank0.txt").read_text()
    (run / ".checkpoint.pth.abc123.tmp").write_bytes(b"half a checkpoint: a save killed mid-write")
    other = write_images(tmp_path / "other")
    for change, shown in [(["optim.batch_size=4"], "optim.batch_size: 8 -> 4"),
                          ([f"data.name={other}"], f"data.name: '{tmp_path}/images' -> '{other}'"),
                          (["model.backbone=resnet18", "optim.lr=1e-4"],
                           "model.backbone: 'resnet_tiny' -> 'resnet18'; optim.lr: 0.3 -> 0.0001")]:
        with pytest.raises(SystemExit, match=rf"^error: {run}/checkpoint.pth was trained with another config.*"
                                             rf"{shown}.*--allow-config-change"):
            pretrain_main(run, *change)
        assert (run / "config.yaml").read_text() == config  # (this process's earlier log handler may add a line)
        assert (run / "log_rank0.txt").read_text().count("pretraining on") == log.count("pretraining on") == 1
        assert not list(run.glob(".checkpoint.pth.*.tmp"))  # stale temporaries are removed on start (under the lock)


def test_harmless_changes_are_accepted_and_trajectory_changes_need_the_flag(tmp_path):
    run = tmp_path / "run"
    cfg = _tiny_checkpoint(run)
    from selfsup.config import to_dict
    from selfsup.moco.config import HARMLESS_KEYS
    from selfsup.rundir import open_run_dir
    harmless = load_config(PretrainConfig, overrides=TINY_PRETRAIN + [
        f"output_dir={run}", "data.num_workers=3", "train.log_every_steps=7", "train.checkpoint_every_steps=5"])
    with open_run_dir(run, to_dict(harmless), harmless=HARMLESS_KEYS) as opened:
        assert [c[0] for c in opened.accepted_changes] == ["data.num_workers", "train.checkpoint_every_steps",
                                                           "train.log_every_steps"]
    changed = load_config(PretrainConfig, overrides=TINY_PRETRAIN + [f"output_dir={run}", "train.seed=1"])
    with pytest.raises(ConfigError, match=r"train\.seed: 0 -> 1"):
        open_run_dir(run, to_dict(changed), harmless=HARMLESS_KEYS)
    with open_run_dir(run, to_dict(changed), harmless=HARMLESS_KEYS, allow_change=True) as opened:
        assert opened.accepted_changes == [("train.seed", 0, 1)]
    assert cfg.train.seed == 0


# ---------------------------------------------------------------- 4, 7, 8. configs as users write them

def test_scientific_notation_on_the_command_line_and_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  weight_decay: 5E-5\n")
    cfg = load_config(PretrainConfig, yaml_path=path, overrides=["moco.temperature=2e-1"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 5e-5 and cfg.moco.temperature == 0.2
    assert parse_overrides(["optim.lr=1e-4", "name=1e"]) == {"optim": {"lr": 1e-4}, "name": "1e"}
    from downstream.mtl.config import MTLConfig
    assert load_config(MTLConfig, overrides=["optim.lr=1e-4"]).optim.lr == 1e-4


@pytest.mark.parametrize("override", ["train.epochs=0", "train.epochs=-1", "optim.batch_size=-8", "moco.queue_size=0",
                                      "augment.large_size=0", "train.checkpoint_every_steps=0", "data.num_workers=-1"])
def test_non_positive_counts_and_sizes_are_errors(override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}=-?\d+: must be"):
        load_config(PretrainConfig, overrides=[override])


@pytest.mark.parametrize("override", ["epochs=0", "data.batch_size=0", "max_iters_per_epoch=-1", "eval.every=-1"])
def test_non_positive_counts_are_errors_in_mtl(override):
    from downstream.mtl.config import MTLConfig
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}=-?\d+: must be"):
        load_config(MTLConfig, overrides=[override])


def test_overrides_are_accepted_after_flags():
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import pretrain
    finally:
        sys.path.remove(str(REPO / "launch"))
    args = pretrain.parse_args(["model.backbone=resnet_tiny", "--data", "D", "optim.lr=0.1", "--multicrop", "x.y=1"])
    assert args.overrides == ["model.backbone=resnet_tiny", "optim.lr=0.1", "x.y=1"] and args.data == "D"
    from downstream.finetune_mtl import parse_args
    assert parse_args(["--epochs", "2", "optim.lr=1e-4"]).overrides == ["optim.lr=1e-4"]


# ---------------------------------------------------------------- 5. bad checkpoints

def _bad_checkpoints(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    files = {"truncated": good.read_bytes()[:300], "random bytes": np.random.default_rng(0).bytes(4096)}
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name.replace(' ', '_')}.pth"
        out[name].write_bytes(data)
    out["a tensor"] = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), out["a tensor"])
    out["no weights"] = tmp_path / "noweights.pth"
    torch.save({"epoch": 3, "arch": "resnet18"}, out["no weights"])
    out["missing"] = tmp_path / "missing.pth"
    return out


EXPECTED = {"truncated": "truncated or not a PyTorch file", "random bytes": "not a", "a tensor": "holds a Tensor; expected a dict",
            "no weights": "has no model weights", "missing": "not found"}


def test_bad_checkpoints_give_one_line_naming_the_file(tmp_path, embedded_root):
    """--weights of finetune_mtl.py and linear_probe.py, and launch/export.py: truncated, random bytes, a tensor,
    a dict without weights, a missing path -> one line naming the file and what was expected."""
    scripts = {"export": [str(REPO / "launch" / "export.py"), "--weights", "{}", "--format", "torchvision", "--out", str(tmp_path / "x.pth")],
               "probe": [str(REPO / "downstream" / "linear_probe.py"), "--weights", "{}", "--backbone", "resnet_tiny"],
               "mtl": [str(REPO / "downstream" / "finetune_mtl.py"), "--weights", "{}", "--output-dir", str(tmp_path / "m"),
                       "model.backbone=resnet_tiny", "model.arch=mtl_baseline", "data.tasks=[semseg]",
                       "data.crop_size=[32,32]", "model.head_channels=8", "model.fpn_channels=8"]}
    files = _bad_checkpoints(tmp_path)
    code = ("import sys, runpy\nfor argv in {}:\n    sys.argv = argv\n    try:\n        runpy.run_path(argv[0], run_name='__main__')\n"
            "    except SystemExit as e:\n        print(e.code, file=sys.stderr)\n    print('---', file=sys.stderr)\n")
    cases = [(s, n) for s in scripts for n in files]
    argvs = [[a.format(files[n]) for a in scripts[s]] for s, n in cases]
    proc = subprocess.run([PYTHON, "-c", code.format(argvs)], capture_output=True, text=True, env=run_env(), timeout=300)
    outputs = proc.stderr.split("---\n")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for (script, name), err in zip(cases, outputs):
        line = err.strip().splitlines()[-1]  # (the lines above it are warnings and logs, if any)
        assert line.startswith("error: "), (script, name, err)
        assert str(files[name]) in line and EXPECTED[name] in line, (script, name, line)
        assert "weights_only=False" not in line


# ---------------------------------------------------------------- 6. one line instead of a traceback

@pytest.mark.parametrize("args, message", [
    (["moco.queue_size=36"], r"moco\.queue_size=36 must be divisible by optim\.batch_size=8"),
    (["optim.batch_size=16", "moco.queue_size=32"], r"optim\.batch_size=16 is larger than the 8 images"),
    (["optim.batch_size=-8"], r"optim\.batch_size=-8: must be > 0"),
    (["train.epochs=0"], r"train\.epochs=0: must be > 0"),
])
def test_bad_values_give_one_line_naming_the_key(tmp_path, args, message):
    with pytest.raises(SystemExit, match=rf"^error: .*{message}"):
        pretrain_main(tmp_path / "run", *args)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.1\n  batch_size: [16,\n")
    with pytest.raises(SystemExit, match=rf"^error: {path}, line \d+, column \d+: invalid YAML"):
        pretrain_main(tmp_path / "run", "--config", str(path))


def test_output_dir_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=rf"^error: output_dir={tmp_path}/file/run: {tmp_path}/file is a file"):
        pretrain_main(tmp_path / "file" / "run", images=tmp_path / "images")


def test_folder_without_readable_images(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(SystemExit, match=rf"^error: {folder}: 0 of 8 files are images .*0.jpg \(not an image\)"):
        pretrain_main(tmp_path / "run", f"data.name={folder}")


def test_nan_loss_is_one_line_with_the_step(tmp_path, monkeypatch):
    from selfsup.moco import model as moco_model
    real = moco_model.instance_loss

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(moco_model, "instance_loss", poisoned)
    with pytest.raises(SystemExit, match=r"^error: non-finite loss nan at epoch 0, step \d+"):
        pretrain_main(tmp_path / "run")


# ---------------------------------------------------------------- 9. silent bad data

def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    from selfsup.data.images import load_rgb
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rgb = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb[..., 0], np.rint(ramp / 257.0), atol=1)
    assert (rgb == 255).mean() < 0.01  # PIL's own convert("RGB") clips ~100% of these pixels to 255
    from selfsup.augment.decode import decode_reduced, open_lazy  # the pretraining loaders' decoder
    with open_lazy(str(tmp_path / "g16.png")) as img:
        decoded, _ = decode_reduced(img, [(0, 0, 64, 64)], [32])
    assert np.array_equal(np.asarray(decoded), rgb)


@pytest.mark.parametrize("task, array, message", [
    ("depth", np.ones((2, 2, 3), np.float32), r"depth must be \[H,W\].*got shape \(2, 2, 3\)"),
    ("edge", np.ones((2, 2, 2), np.float32), r"edge must be \[H,W\].*got shape \(2, 2, 2\)"),
    ("normals", np.ones((2, 2), np.float32), r"normals must be \[H,W,3\].*got shape \(2, 2\)"),
    ("depth", np.array([["a", "b"], ["c", "d"]]), r"depth must hold numbers, got dtype <U1"),
])
def test_nyud_label_arrays_of_wrong_shape_or_dtype_name_the_file(tmp_path, task, array, message):
    from selfsup.data.images import DataError
    from downstream.datasets.nyud import load_label_array
    path = tmp_path / f"{task}.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=rf"{path}: {message}"):
        load_label_array(path, task)
    np.save(path, np.ones((1, 2, 2) if task != "normals" else (2, 2, 3), np.float32))  # accepted layouts
    assert load_label_array(path, task).shape == ((2, 2) if task != "normals" else (2, 2, 3))


# ---------------------------------------------------------------- 3. MTL resume is bit-exact

MTL_TINY = ["epochs=3", "max_iters_per_epoch=2", "progress=false", "vis_every=0", "data.batch_size=2",
            "data.eval_batch_size=2", "data.num_workers=0", "data.max_train_images=6", "data.max_val_images=2",
            "data.crop_size=[48,48]", "model.arch=mtl_baseline", "model.backbone=resnet_tiny", "model.fpn_channels=8",
            "model.head_channels=8", "model.depth_init=none"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mtl_resume_after_a_crash_mid_epoch_is_bit_exact(tmp_path, embedded_root, monkeypatch):
    """finetune_mtl: a run interrupted in epoch 2 (its last checkpoint is from epoch 1) and rerun with the same
    command ends with every tensor equal to an uninterrupted run's: data order and flip/scale/crop draws are a
    function of (seed, epoch, index), not of a loader generator re-seeded at each start."""
    from downstream.finetune_mtl import main
    from downstream.mtl import train as mtl_train

    def run(out):
        return main(["--data-root", str(embedded_root / "nyud"), "--output-dir", str(out), *MTL_TINY])

    full = run(tmp_path / "full")
    real = mtl_train.train_one_epoch

    def crash_in_epoch_1(*args, **kwargs):
        if kwargs["epoch"] == 1:
            real(*args, **{**kwargs, "max_iters": 1})  # half of epoch 1 trains, then the process "dies"
            raise KeyboardInterrupt("killed mid-epoch")
        return real(*args, **kwargs)

    monkeypatch.setattr(mtl_train, "train_one_epoch", crash_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    assert ckpt.load_checkpoint(tmp_path / "resumed" / "checkpoint.pth")["epoch"] == 1
    monkeypatch.setattr(mtl_train, "train_one_epoch", real)
    resumed = run(tmp_path / "resumed")  # the same command again: resumes at epoch 1
    a, b = (ckpt.load_checkpoint(tmp_path / d / "checkpoint.pth") for d in ("full", "resumed"))
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items()), i
    assert resumed["metrics"] == full["metrics"]


def test_mtl_epoch_order_and_draws_depend_only_on_seed_epoch_index():
    from downstream.mtl.data import EpochSampler, SeededSamples

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return float(torch.rand(()))

    sampler = EpochSampler(10, seed=3, rank=1, world_size=2)
    sampler.set_epoch(4)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 5 and all(e == 4 for e, _ in keys)
    other = EpochSampler(10, seed=3, rank=0, world_size=2)
    other.set_epoch(4)
    assert sorted(i for _, i in keys + list(other)) == list(range(10))  # the two shards cover the epoch
    ds = SeededSamples(Draws(), seed=3)
    state = torch.get_rng_state()
    assert ds[(4, 7)] == ds[(4, 7)] != ds[(5, 7)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
