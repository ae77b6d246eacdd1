"""Partial and inconsistent data, and resumes that do not fit (issue 31): each fault is made for real on a shadow
copy of the generated embedded data (symlinks, with real copies of what a test deletes or rewrites) or with
garbage files, the real entry point runs, and the test asserts the one-line message (path + cause) and what is
kept. docs/reliability.md, "Partial and inconsistent data", lists them.
"""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PYTHON, REPO, run_env
from selfsup.data.images import DataError

pytestmark = pytest.mark.timeout(120)


def shadow(src: Path, dst: Path, *writable: str) -> Path:
    """``dst``: ``src`` as symlinks, except that the ``writable`` relative paths (and the folders above them) are
    real copies a test may change without touching the shared data."""
    def build(s: Path, d: Path, wanted):
        d.mkdir(parents=True)
        for entry in sorted(s.iterdir()):
            inner = [w[1:] for w in wanted if w[0] == entry.name]
            if any(not w for w in inner):
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, d / entry.name)
            elif inner:
                build(entry, d / entry.name, inner)
            else:
                (d / entry.name).symlink_to(entry)
    build(src, dst, [Path(w).parts for w in writable])
    return dst


@pytest.fixture(scope="module")
def davis(embedded_root):
    """(DAVIS root, its first val sequence)."""
    root = embedded_root / "davis2017"
    return root, (root / "ImageSets" / "2017" / "val.txt").read_text().split()[0]


def one_sequence_davis(davis, tmp_path) -> tuple:
    """A DAVIS root whose val split is its first val sequence alone, that sequence's files real copies."""
    root, seq = davis
    out = shadow(root, tmp_path / "davis", "ImageSets", f"JPEGImages/480p/{seq}", f"Annotations/480p/{seq}")
    (out / "ImageSets" / "2017" / "val.txt").write_text(seq + "\n")
    return out, out / "JPEGImages" / "480p" / seq, out / "Annotations" / "480p" / seq


def davis_main(*args):
    from downstream.davis_propagation import main
    return main(["--weights", "none", "--arch", "resnet_tiny", "--no-pictures", *map(str, args)])


# ---------------------------------------------------------------- DAVIS: frames vs annotations

def test_davis_frame_without_annotation_is_scored_without_it_and_counted(davis, tmp_path, caplog):
    """The probe's fault: one annotation PNG deleted. Was: rc 0 and J&F with no word. Now the frame is propagated
    through, not scored, and counted in results.json and in warning lines (the reader's and the scorer's)."""
    root, frames, annotations = one_sequence_davis(davis, tmp_path)
    (annotations / "00005.png").unlink()
    with caplog.at_level(logging.WARNING):
        davis_main("--data-root", root, "--output-dir", tmp_path / "out")
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    seq = frames.name
    assert result["skipped_frames"] == 1 and result["skipped_frames_by_sequence"] == {seq: ["00005"]}
    assert 0 <= result["J&F-Mean"] <= 100 and result["frames"] == 23  # all 24 frames propagated
    assert f"1 frames of 1 sequences have no annotation and are not scored: {seq}: 00005" in caplog.text
    assert f"sequence {seq}: 1 frames have no annotation (00005): propagated, not scored" in caplog.text
    # the predictions of the unannotated frame are written (the propagation went through it)
    assert (tmp_path / "out" / seq / "00005.png").is_file()
    from frozen.davis import DAVIS2017
    from frozen.davis_metrics import scored_rows
    dataset = DAVIS2017(root, split="val")
    assert dataset.annotated_frames(0) == [t for t in range(24) if t != 5]
    assert scored_rows(dataset.annotated_frames(0), 24) == list(range(1, 22))  # frames 1..23 without 5: 21 rows


def _delete_jpeg(frames, annotations):
    (frames / "00005.jpg").unlink()


def _delete_jpeg_and_annotation(frames, annotations):
    (frames / "00005.jpg").unlink()
    (annotations / "00005.png").unlink()


def _delete_first_annotation(frames, annotations):
    (annotations / "00000.png").unlink()


def _extra_annotation(frames, annotations):
    shutil.copy(annotations / "00023.png", annotations / "00024.png")


def _no_annotations(frames, annotations):
    for p in annotations.glob("*.png"):
        p.unlink()


@pytest.mark.parametrize("fault, message", [
    (_delete_jpeg, r"1 annotations have no frame: 00005 \(no {frames}/00005\.jpg; 23 frames, 24 annotations\)"),
    (_delete_jpeg_and_annotation, r"1 frames missing from the numbering 00000\.\.00023: 00005 \(no {frames}/00005\.jpg\)"),
    (_delete_first_annotation, r"the first frame 00000 has no annotation \(no {annotations}/00000\.png\); propagation "
                               r"starts from it"),
    (_extra_annotation, r"1 annotations have no frame: 00024 \(no {frames}/00024\.jpg; 24 frames, 25 annotations\)"),
    (_no_annotations, r"no \.png annotations in {annotations}"),
])
def test_davis_missing_or_mismatched_files_are_one_line_naming_sequence_and_frames(davis, tmp_path, fault, message):
    """A deleted JPEG (was: a traceback blaming missing prediction PNGs), a gap, a first frame without annotation,
    more annotations than frames, no annotations: refused before any computation, nothing written."""
    root, frames, annotations = one_sequence_davis(davis, tmp_path)
    fault(frames, annotations)
    expected = message.format(frames=frames, annotations=annotations)
    with pytest.raises(SystemExit, match=rf"^error: {root}: 1 of 1 DAVIS val sequences have missing or mismatched "
                                         rf"files: {frames.name}: {expected}$"):
        davis_main("--data-root", root, "--output-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_davis_annotation_of_another_size_names_the_file(davis, tmp_path):
    root, frames, annotations = one_sequence_davis(davis, tmp_path)
    small = np.asarray(Image.open(annotations / "00007.png"))[:-8]
    Image.fromarray(small).save(annotations / "00007.png")
    with pytest.raises(SystemExit, match=rf"^error: {annotations}/00007\.png: annotation of size \(\d+, \d+\) in a "
                                         rf"sequence of \(\d+, \d+\)"):
        davis_main("--data-root", root, "--output-dir", tmp_path / "out")


def test_davis_first_frame_only_is_propagated_not_scored(davis, tmp_path, caplog):
    """test-dev ships the first annotation only: predictions are written, results.json says not scored; scoring
    them (--eval-only) is a one-line error, not NaN."""
    root, frames, annotations = one_sequence_davis(davis, tmp_path)
    for p in sorted(annotations.glob("*.png"))[1:]:
        p.unlink()
    with caplog.at_level(logging.WARNING):
        davis_main("--data-root", root, "--output-dir", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["scored"] is False
    assert len(list((tmp_path / "out" / frames.name).glob("*.png"))) == 24
    assert "annotated in its first frame only (a test-dev split): predictions written" in caplog.text
    with pytest.raises(SystemExit, match=rf"^error: {root}: 1 sequences of val are annotated in their first frame only "
                                         rf"\({frames.name}\): nothing to score"):
        davis_main("--data-root", root, "--eval-only", tmp_path / "out")


# ---------------------------------------------------------------- empty split lists

@pytest.mark.parametrize("dataset, split_file", [
    ("nyud", "gt_sets/train.txt"), ("pascal_context", "ImageSets/Context/train.txt"),
    ("davis2017", "ImageSets/2017/train.txt"), ("voc2012", "ImageSets/Segmentation/train.txt"),
    ("voc07", "ImageSets/Main/aeroplane_trainval.txt"),
])
def test_empty_split_list_names_the_file(embedded_root, tmp_path, dataset, split_file):
    import downstream.datasets  # noqa: F401  (the readers register their datasets and layouts when imported)
    import frozen  # noqa: F401
    from selfsup.data import build_dataset
    from selfsup.data.catalog import EMBEDDED_SUBDIR
    root = shadow(embedded_root / EMBEDDED_SUBDIR[dataset], tmp_path / dataset, split_file)
    (root / split_file).write_text("\n  \n")  # blank lines are no ids
    split = "trainval" if dataset == "voc07" else "train"
    with pytest.raises(DataError, match=rf"^{root / split_file}: empty split list \(0 ids\)"):
        build_dataset(dataset, root=root, split=split)


def test_segment_retrieval_with_an_empty_voc_list_is_one_line(embedded_root, tmp_path):
    """The probe's fault: empty VOC image lists. Was: ValueError: no train segment has a labelled pixel."""
    from downstream.segment_retrieval import main
    root = shadow(embedded_root / "voc2012", tmp_path / "voc", "ImageSets/Segmentation")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("")
    with pytest.raises(SystemExit, match=rf"^error: {root}/ImageSets/Segmentation/train\.txt: empty split list \(0 ids\)"):
        main(["--weights", "none", "--arch", "resnet_tiny", "--data-root", str(root), "--output-dir", str(tmp_path / "o")])


# ---------------------------------------------------------------- folders without images

def garbage_folder(folder: Path) -> Path:
    """The probe's folder: 10 files, none an image (two without an image name, eight .jpg of random bytes)."""
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("not an image\n")
    rng = np.random.default_rng(0)
    (folder / "b.bin").write_bytes(rng.bytes(100))
    for i in range(8):
        (folder / f"c{i}.jpg").write_bytes(rng.bytes(300))
    return folder


def test_pretraining_on_a_folder_without_images_names_the_files(tmp_path):
    """Was: "batch_size=16 is larger than the 10 images". Now the cause, before any config.yaml is written."""
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import pretrain
    finally:
        sys.path.remove(str(REPO / "launch"))
    folder = garbage_folder(tmp_path / "junk")
    with pytest.raises(SystemExit, match=rf"^error: {folder}: 0 of 10 files are images \(expected \.jpg/\.jpeg/\.png "
                                         rf"files that decode\): a\.txt, b\.bin, c0\.jpg \(not an image\), c1\.jpg "
                                         rf"\(not an image\), c2\.jpg \(not an image\), \.\.\. \(\+5 more\)$"):
        pretrain.main(["--data", str(folder), "model.arch=resnet_tiny", "optim.batch_size=16", "data.num_workers=0",
                       "data.knn_monitor=none", "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_class_folders_without_images_name_the_split(tmp_path):
    """linear probe / kNN data (classification folders): one line naming the split folder and its files."""
    from downstream.linear_probe import main
    for split in ("train", "val"):
        garbage_folder(tmp_path / "cls" / split / "cat")
    with pytest.raises(SystemExit, match=rf"^error: {tmp_path}/cls/train: 0 of 10 files are images .*: cat/a\.txt, "
                                         rf"cat/b\.bin, cat/c0\.jpg \(not an image\)"):
        main(["--weights", "none", "--arch", "resnet_tiny", "--data-root", str(tmp_path / "cls")])
    from selfsup.data import ClassificationFolder, ImageFolder
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=rf"^{tmp_path}/empty: no files \(expected"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "flat" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=rf"^{tmp_path}/flat/train: no class folders"):
        ClassificationFolder(tmp_path / "flat", split="train")
    good = tmp_path / "mixed" / "x.png"  # one image among garbage: accepted (the garbage is skipped and counted)
    garbage_folder(good.parent)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    assert len(ImageFolder(good.parent)) == 9


# ---------------------------------------------------------------- bad checkpoints to the evaluation entry points

@pytest.mark.timeout(300)
def test_bad_checkpoints_to_davis_and_retrieval_are_one_line(tmp_path, embedded_root):
    """The real scripts (one interpreter, runpy): truncated, a tensor, no weights, missing -> one line naming the
    file, no traceback (was: the right text inside a full traceback)."""
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    files = {"truncated or not a PyTorch file": tmp_path / "truncated.pth", "holds a Tensor; expected a dict":
             tmp_path / "tensor.pth", "do not match the backbone": tmp_path / "other.pth", "not found": tmp_path / "no.pth"}
    files["truncated or not a PyTorch file"].write_bytes(good.read_bytes()[:300])
    torch.save(torch.zeros(3), files["holds a Tensor; expected a dict"])
    torch.save({"model": {"w": torch.zeros(2)}}, files["do not match the backbone"])
    scripts = [str(REPO / "downstream" / s) for s in ("davis_propagation.py", "segment_retrieval.py")]
    argvs = [[s, "--weights", str(f), "--arch", "resnet_tiny", "--output-dir", str(tmp_path / "o")]
             for s in scripts for f in files.values()]
    code = ("import sys, runpy\nfor argv in {}:\n    sys.argv = argv\n    try:\n        runpy.run_path(argv[0], run_name='__main__')\n"
            "    except SystemExit as e:\n        print(e.code, file=sys.stderr)\n    print('---', file=sys.stderr)\n")
    proc = subprocess.run([PYTHON, "-c", code.format(argvs)], capture_output=True, text=True, env=run_env(), timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    outputs = proc.stderr.split("---\n")[:-1]
    assert len(outputs) == len(argvs)
    for (expected, path), err in zip(list(files.items()) * 2, outputs):
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ") and str(path) in line and expected in line, line


@pytest.mark.timeout(300)
def test_davis_cli_deleted_frame_rc_and_one_line(davis, tmp_path):
    """The command line itself: rc 1, one line on stderr, no traceback."""
    root, frames, annotations = one_sequence_davis(davis, tmp_path)
    (frames / "00003.jpg").unlink()
    proc = subprocess.run([PYTHON, str(REPO / "downstream" / "davis_propagation.py"), "--weights", "none", "--arch",
                           "resnet_tiny", "--data-root", str(root), "--output-dir", str(tmp_path / "o")],
                          capture_output=True, text=True, env=run_env(), timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {root}: 1 of 1 DAVIS val sequences")
    assert "00003" in proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- resumes that do not fit

PRETRAIN = ["model.hidden_dim=16", "model.dim=8", "augment.large_size=32", "augment.small_size=16",
            "optim.batch_size=8", "moco.queue_size=32", "data.num_workers=0", "data.knn_monitor=none",
            "train.epochs=1", "train.steps_per_epoch=1"]


def _pretrain(run, images, *args):
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import pretrain
    finally:
        sys.path.remove(str(REPO / "launch"))
    return pretrain.main(["--data", str(images), *PRETRAIN, "--output-dir", str(run), *args])


def _images(folder, n=8):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_pretraining_resume_with_another_architecture_is_one_line_and_keeps_config(tmp_path, caplog):
    """--allow-config-change model.arch=...: was a raw size-mismatch traceback after config.yaml was overwritten.
    Then optim.name=adamw: was `error: betas` (SGD's state into AdamW); now AdamW starts fresh, with a warning, and
    keeps the configured weight decay."""
    from selfsup import checkpoint as ckpt
    run, images = tmp_path / "run", _images(tmp_path / "images")
    _pretrain(run, images, "model.arch=resnet_tiny")
    config, weights = (run / "config.yaml").read_bytes(), (run / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit, match=rf"^error: weights from {run}/checkpoint\.pth do not match the model of this "
                                         rf"config: .*shape mismatches: .*encoder_q\.backbone\.conv1\.weight: checkpoint "
                                         rf"\(16, 3, 7, 7\) vs model \(32, 3, 7, 7\).*--allow-config-change cannot change "
                                         rf"the model of a run \(changed: model\.(arch|backbone): 'resnet_tiny' -> 'resnet_small'\)"):
        _pretrain(run, images, "model.arch=resnet_small", "--allow-config-change")
    assert (run / "config.yaml").read_bytes() == config and (run / "checkpoint.pth").read_bytes() == weights
    with caplog.at_level(logging.WARNING):
        _pretrain(run, images, "model.arch=resnet_tiny", "train.epochs=2", "optim.name=adamw",
                  "optim.weight_decay=0.05", "--allow-config-change")
    assert "its optimizer state is of another optimizer (groups with dampening, momentum; AdamW has betas, eps): " \
           "AdamW starts with fresh state" in caplog.text
    state = ckpt.load_checkpoint(run / "checkpoint.pth")
    assert state["global_step"] == 2 and state["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    assert "name: adamw" in (run / "config.yaml").read_text()


MTL = ["epochs=1", "max_iters_per_epoch=1", "progress=false", "vis_every=0", "data.batch_size=2",
       "data.eval_batch_size=2", "data.num_workers=0", "data.max_train_images=4", "data.max_val_images=2",
       "data.crop_size=[48,48]", "model.arch=mtl_baseline", "model.backbone=resnet_tiny", "model.fpn_channels=8",
       "model.head_channels=8", "model.depth_init=none", "--weights", "none"]


def test_finetuning_resume_with_another_optimizer_or_head_size(tmp_path, embedded_root, caplog):
    """--allow-config-change optim.optimizer=sgd: was `error: momentum` (Adam's state into SGD); now SGD starts
    fresh with a warning. model.head_channels=16: one line listing the shapes; config.yaml kept."""
    from downstream.finetune_mtl import main
    from selfsup import checkpoint as ckpt
    out = tmp_path / "mtl"

    def run(*args):
        return main(["--data-root", str(embedded_root / "nyud"), "--output-dir", str(out), *MTL, *args])

    run()
    with caplog.at_level(logging.WARNING):
        run("epochs=2", "optim.optimizer=sgd", "--allow-config-change")
    assert "(groups with betas, eps; SGD has dampening, momentum): SGD starts with fresh state" in caplog.text
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    assert state["epoch"] == 2 and state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    config = (out / "config.yaml").read_bytes()
    with pytest.raises(SystemExit, match=rf"^error: weights from {out}/checkpoint\.pth do not match the model of this "
                                         rf"config: .*heads\.semseg\.fuse\.0\.weight: checkpoint \(8, 32, 1, 1\) vs model "
                                         rf"\(16, 32, 1, 1\).*changed: .*model\.head_channels: 8 -> 16"):
        run("epochs=3", "optim.optimizer=sgd", "model.head_channels=16", "--allow-config-change")
    assert (out / "config.yaml").read_bytes() == config


def test_optimizer_resume_keeps_the_configured_hyperparameters():
    """PyTorch's load_state_dict restores the checkpoint's weight decay and momentum: a change accepted by
    --allow-config-change would be silently dropped. The lr is the schedule's (set every step)."""
    from selfsup.checkpoint import CheckpointMismatchError, load_optimizer_state
    p = [torch.nn.Parameter(torch.ones(3))]
    old = torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4)
    p[0].grad = torch.ones(3)
    old.step()
    new = torch.optim.SGD(p, lr=0.1, momentum=0.5, weight_decay=0.0)
    assert load_optimizer_state(new, old.state_dict(), source="ck.pth")
    group = new.param_groups[0]
    assert group["momentum"] == 0.5 and group["weight_decay"] == 0.0
    assert torch.equal(new.state[p[0]]["momentum_buffer"], old.state[p[0]]["momentum_buffer"])  # the state carried over
    two = torch.optim.SGD([{"params": p}, {"params": [torch.nn.Parameter(torch.ones(1))]}], lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointMismatchError, match=r"^ck\.pth: the optimizer state does not fit .*parameter groups: "
                                                      r"checkpoint \[1\] vs config \[1, 1\]"):
        load_optimizer_state(two, old.state_dict(), source="ck.pth")


def test_unknown_optimizer_is_a_config_error_naming_the_key():
    """Was: a ValueError traceback from the fine-tuning set-up, after the run dir was made."""
    from downstream.mtl.config import MTLConfig
    from selfsup.config import ConfigError, load_config
    from selfsup.moco.config import PretrainConfig
    with pytest.raises(ConfigError, match=r"optim\.optimizer='sgdd': expected adam or sgd"):
        load_config(MTLConfig, overrides=["optim.optimizer=sgdd"])
    with pytest.raises(ConfigError, match=r"optim\.name='adam': expected one of sgd, adamw"):
        load_config(PretrainConfig, overrides=["optim.name=adam"])
