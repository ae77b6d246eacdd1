"""DAVIS J&F, label propagation, segment retrieval, the VOC07 SVM probe and their entry points (known answers)."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import PYTHON, TINY_PRETRAIN, run_env
from selfsup.config import ConfigError
from frozen.davis_metrics import (ObjectScores, boundary_f_measure, boundary_tolerance,
                                                 evaluate_sequence, region_similarity, statistics, summarize)
from frozen.features import upsample_cells
from frozen.propagation import PropagationConfig, propagate_labels
from frozen.retrieval import SUBSET_7_IDS, retrieval_miou
from downstream.evaluation.svm import average_precision, svm_map


def _box(shape, top, left, height, width):
    m = np.zeros(shape, bool)
    m[top:top + height, left:left + width] = True
    return m


def test_region_similarity_known_answers():
    empty = np.zeros((4, 4), bool)
    assert region_similarity(empty, empty, empty) == 1.0  # both empty
    gt, pred = _box((4, 4), 0, 0, 2, 2), _box((4, 4), 0, 0, 2, 4)
    assert region_similarity(pred, gt, empty) == pytest.approx(4 / 8)
    void = _box((4, 4), 0, 2, 2, 2)  # the extra predicted pixels are void: excluded
    assert region_similarity(pred, gt, void) == 1.0


def test_boundary_f_tolerance_just_inside_and_outside():
    shape = (100, 100)
    tol = boundary_tolerance(shape)
    assert tol == int(np.ceil(0.008 * np.hypot(100, 100))) == 2
    gt, void = _box(shape, 30, 20, 20, 60), np.zeros(shape, bool)
    assert boundary_f_measure(gt, gt, void) == 1.0
    assert boundary_f_measure(_box(shape, 30 + tol, 20, 20, 60), gt, void) == 1.0  # shifted by the tolerance
    assert boundary_f_measure(_box(shape, 30 + tol + 1, 20, 20, 60), gt, void) < 0.9  # one pixel further
    assert boundary_f_measure(np.zeros(shape, bool), gt, void) == 0.0


def test_statistics_recall_and_decay_on_a_hand_made_sequence():
    mean, recall, decay = statistics([1.0, 1.0, 0.6, 0.6, 0.4, 0.4, 0.0, 0.0])
    assert mean == pytest.approx(0.5)
    assert recall == pytest.approx(4 / 8)
    # official bin edges for 8 frames: 0,2,4,5,7 -> first bin [1, 1, 0.6], last bin [0.4, 0, 0]
    assert decay == pytest.approx((1 + 1 + 0.6) / 3 - 0.4 / 3)


def test_jf_aggregates_over_objects_of_different_sequences():
    objects = [ObjectScores("a", 1, [1.0, 1.0], [0.5, 0.5]), ObjectScores("a", 2, [0.0, 0.0], [0.0, 0.0]),
               ObjectScores("b", 1, [0.5, 0.5], [1.0, 1.0])]
    global_results, rows = summarize(objects)
    assert global_results["J-Mean"] == pytest.approx(50.0)
    assert global_results["F-Mean"] == pytest.approx(50.0)
    assert global_results["J&F-Mean"] == pytest.approx(50.0)
    assert [r["Sequence"] for r in rows] == ["a_1", "a_2", "b_1"]
    # evaluate_sequence skips the first and last frames and the void label
    gt = np.zeros((3, 8, 8), np.uint8)
    gt[:, 2:6, 2:6] = 1
    gt[1, 0, 0] = 255
    pred = gt.copy()
    pred[1, 0, 0] = 1  # on void: not an error
    pred[0] = 0  # the first frame does not count
    [scores] = evaluate_sequence("s", gt, pred)
    assert scores.j == [1.0] and scores.f == [1.0]


def test_propagation_follows_a_known_translation():
    g = torch.Generator().manual_seed(0)
    T, C, h, w, size = 8, 32, 16, 24, 6
    background = F.normalize(torch.randn(C, h, w, generator=g), dim=0)
    texture = F.normalize(torch.randn(C, size, size, generator=g), dim=0)  # moves with the object
    feats, masks = [], []
    for t in range(T):
        top, left = 4 + t // 2, 2 + t  # 1 cell right per frame, 1 cell down every 2 frames
        f = background.clone()
        f[:, top:top + size, left:left + size] = texture
        m = torch.zeros(h, w, dtype=torch.long)
        m[top:top + size, left:left + size] = 1
        feats.append(f)
        masks.append(m)
    first = F.one_hot(masks[0], 2).permute(2, 0, 1).float()
    soft = propagate_labels(torch.stack(feats), first, PropagationConfig(context=3))
    pred = upsample_cells(soft, (h * 8, w * 8)).argmax(1)
    for t in range(1, T):
        gt = masks[t].repeat_interleave(8, 0).repeat_interleave(8, 1).numpy().astype(bool)
        assert region_similarity(pred[t].numpy() == 1, gt, np.zeros_like(gt)) > 0.9


def test_retrieval_with_hand_made_features_is_perfect():
    g = np.random.default_rng(0)
    codes = np.eye(21, dtype=np.float32)  # one direction per class

    def item(classes):
        gt = np.zeros((16, 24), np.int64)
        for i, c in enumerate(classes):
            gt[:, 8 * i:8 * i + 8] = c
        emb = codes[gt].transpose(2, 0, 1).copy()
        gt[0, 0] = 255  # void pixels do not count
        return emb, gt

    train = [item(g.choice(21, 3, replace=False)) for _ in range(12)]
    train.append(item(list(range(21))[:3]))
    present = sorted({int(c) for _, gt in train for c in np.unique(gt) if c != 255})
    val = [item(g.choice(present, 3, replace=False)) for _ in range(6)] + [item(list(SUBSET_7_IDS[:3]))]
    result = retrieval_miou(train, val)
    assert result["miou_21"] == pytest.approx(100.0) and result["miou_7"] == pytest.approx(100.0)
    shuffled = [(emb, np.roll(gt, 8, axis=1)) for emb, gt in val]  # labels moved off their features
    assert retrieval_miou(train, shuffled)["miou_21"] < 50.0


def test_svm_probe_separates_separable_multilabel_features():
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([True, False, True, False])) == \
        pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    labels = torch.randint(0, 2, (160, 4), generator=g) * 2 - 1  # multi-label in {1, -1}
    x = F.normalize(((labels > 0).float() @ centers) + 0.05 * torch.randn(160, 16, generator=g), dim=1)
    labels[:8, 0] = 0  # difficult: negatives
    result = svm_map((x[:100], labels[:100]), (x[100:], labels[100:]))
    assert result["map"] > 99.0
    shuffled = labels[torch.randperm(160, generator=g)]
    assert svm_map((x[:100], shuffled[:100]), (x[100:], shuffled[100:]))["map"] < 80.0


def test_voc07_lists_of_the_embedded_data(embedded_root):
    from frozen.voc import VOC07Classification

    ds = VOC07Classification("embedded", split="test")
    assert ds.labels.shape == (len(ds), 20) and set(np.unique(ds.labels)) <= {-1, 0, 1}
    assert (ds.labels == 1).any(0).all()  # every class has test positives
    image, labels = ds[0]
    assert labels.tolist() == ds.labels[0].tolist() and image.size[1] == 96


def _run(repo, script, *args):
    res = subprocess.run([PYTHON, str(repo / "downstream" / script), *args], capture_output=True, text=True,
                         env=run_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_davis_propagation_cli_on_embedded_data(tmp_path, repo, embedded_root):
    out = tmp_path / "davis"
    _run(repo, "davis_propagation.py", "--weights", "none", "--backbone", "resnet_tiny", "--output-dir", str(out))
    result = json.loads((out / "results.json").read_text())
    assert {"J&F-Mean", "J-Mean", "F-Mean", "frames_per_s"} <= set(result) and 0 <= result["J&F-Mean"] <= 100
    header = (out / "global_results-val.csv").read_text().splitlines()[0]
    assert header == "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay"
    assert (out / "per-sequence_results-val.csv").read_text().startswith("Sequence,J-Mean,F-Mean")
    sequences = (embedded_root / "davis2017" / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert len(list((out / sequences[0]).glob("*.png"))) == 24 and (out / "overlays" / f"{sequences[0]}.png").is_file()
    # --eval-only on the ground truth copied as predictions: J = F = 100
    gt_dir = tmp_path / "gt"
    for seq in sequences:
        shutil.copytree(embedded_root / "davis2017" / "Annotations" / "480p" / seq, gt_dir / seq)
    from downstream.davis_propagation import main as davis_main  # in-process: the same code as the CLI
    davis_main(["--eval-only", str(gt_dir)])
    perfect = json.loads((gt_dir / "results.json").read_text())
    assert perfect["J&F-Mean"] == pytest.approx(100.0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_retrieval_and_svm_clis_on_embedded_data(tmp_path, repo, embedded_root):
    out = tmp_path / "retrieval"
    _run(repo, "segment_retrieval.py", "--weights", "none", "--backbone", "resnet_tiny", "--output-dir", str(out),
         "--max-images", "12")
    result = json.loads((out / "results.json").read_text())
    assert {"miou_21", "miou_7", "images_per_s"} <= set(result) and 0 <= result["miou_21"] <= 100
    assert (out / "retrieval.png").is_file()
    feats = tmp_path / "f.pt"
    _run(repo, "linear_probe.py", "--protocol", "svm", "--weights", "none", "--backbone", "resnet_tiny", "--size", "32",
         "--dump-features", str(feats), "--output-dir", str(tmp_path / "svm"))
    from downstream.linear_probe import main as probe_main
    probe_main(["--protocol", "svm", "--load-features", str(feats), "--svm-cost", "0.5", "--output-dir", str(tmp_path / "svm_c1")])
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("svm", "svm_c1"))
    assert 0 < a["map"] <= 100 and a["map"] == pytest.approx(b["map"])  # the same features: the same mAP


@pytest.mark.timeout(120)
def test_davis_and_retrieval_monitors_reach_tensorboard(tmp_path, embedded_root):
    from selfsup.backbones import build_backbone
    from selfsup.config import load_config
    from selfsup.logs import ScalarWriter
    from selfsup.moco.config import PretrainConfig
    from selfsup.monitors import build_monitors, log_monitors

    cfg = load_config(PretrainConfig, overrides=TINY_PRETRAIN + ["train.monitors=[davis,retrieval]"])
    monitor = build_monitors(cfg, torch.device("cpu"))
    backbone = build_backbone("resnet_tiny").train()
    writer, history = ScalarWriter(tmp_path), []
    log_monitors(monitor, backbone, epoch=1, step=3, writer=writer, history=history)
    writer.close()
    assert backbone.training  # the monitors leave the training state as it was
    assert 0 <= history[0]["davis_jf"] <= 100 and 0 <= history[0]["retrieval_miou"] <= 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {"monitor/davis_jf", "monitor/retrieval_miou", "monitor/seconds_davis"} <= set(acc.Tags()["scalars"])
    with pytest.raises(ConfigError, match="train.monitors: unknown monitor 'jf'; known: davis, knn, retrieval"):
        build_monitors(load_config(PretrainConfig, overrides=["train.monitors=[jf]"]), torch.device("cpu"))
