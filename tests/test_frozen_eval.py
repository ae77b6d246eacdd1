"""Frozen-feature protocols: kNN classifier and linear probe."""
import subprocess

import torch

from conftest import PYTHON, run_env
from downstream.evaluation.linear import train_linear_probe
from frozen.knn import knn_classify


def test_knn_classify_weighted_votes_known_answer():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.436], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # k=3: for the first test point class 1 has sim 1.0 (weight e^(1/0.07)) vs class 0 sims 0 and 0.436
    assert knn_classify(train, labels, test, num_classes=2, k=3).tolist() == [1, 0]
    # k=1 is nearest neighbour
    assert knn_classify(train, labels, torch.tensor([[0.8, 0.6]]), num_classes=2, k=1).tolist() == [0]


def test_linear_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(200) % 4
    x = centers[y] + 0.3 * torch.randn(200, 16, generator=g)
    res = train_linear_probe((x[:150], y[:150]), (x[150:], y[150:]), num_classes=4, epochs=10)
    assert res["val_top1"] == 100.0
    shuffled = y[torch.randperm(200, generator=g)]  # labels unrelated to features: near chance on val
    res = train_linear_probe((x[:150], shuffled[:150]), (x[150:], shuffled[150:]), num_classes=4, epochs=10)
    assert res["val_top1"] < 60.0


def test_linear_probe_cli_runs_on_embedded_data(tmp_path, repo, embedded_root):
    out = tmp_path / "probe" / "results.json"
    res = subprocess.run([PYTHON, str(repo / "downstream" / "linear_probe.py"), "--weights", "none", "--backbone",
                          "resnet_tiny", "--size", "32", "--epochs", "2", "--output-dir", str(out.parent)],
                         capture_output=True, text=True, env=run_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    import json
    data = json.loads(out.read_text())
    assert 0 <= data["val_top1"] <= 100 and 0 <= data["knn_top1"] <= 100
