"""Known-answer tests of the task losses."""
import math

import torch

from downstream.mtl.losses import MultiTaskLoss, balanced_bce, cross_entropy, depth_l1, normals_l1

LOG2 = math.log(2)


def test_balanced_bce_weights_from_batch():
    # 1 positive, 3 negatives, logits 0: w = #neg/#all = 3/4 -> (3/4·log2 + 1/4·3·log2) / 4
    target = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, 4)
    loss = balanced_bce(torch.zeros(1, 1, 1, 4), target)
    assert math.isclose(float(loss), 0.375 * LOG2, rel_tol=1e-6)


def test_balanced_bce_weighs_positives_by_w():
    # a wrong positive costs w = 3/4, a wrong negative 1/4
    target = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, 4)
    pos_wrong = balanced_bce(torch.tensor([-20.0, -20, -20, -20]).view(1, 1, 1, 4), target)
    neg_wrong = balanced_bce(torch.tensor([20.0, 20, -20, -20]).view(1, 1, 1, 4), target)
    assert math.isclose(float(pos_wrong), 0.75 * 20 / 4, rel_tol=1e-4)
    assert math.isclose(float(neg_wrong), 0.25 * 20 / 4, rel_tol=1e-4)


def test_edge_bce_fixed_positive_weight_and_ignore():
    target = torch.tensor([1.0, 0, 255]).view(1, 1, 1, 3)
    loss = balanced_bce(torch.zeros(1, 1, 1, 3), target, pos_weight=0.95)
    assert math.isclose(float(loss), (0.95 * LOG2 + 0.05 * LOG2) / 2, rel_tol=1e-6)


def test_normals_l1_normalises_and_masks_invalid():
    pred = torch.zeros(1, 3, 1, 2)
    pred[0, :, 0, 0] = torch.tensor([2.0, 0, 0])  # -> (1, 0, 0)
    pred[0, :, 0, 1] = torch.tensor([5.0, 5, 5])  # invalid pixel: ignored
    target = torch.zeros(1, 3, 1, 2)
    target[0, :, 0, 0] = torch.tensor([0.0, 1, 0])
    # |1-0| + |0-1| + 0 over 3 valid elements
    assert math.isclose(float(normals_l1(pred, target)), 2 / 3, rel_tol=1e-6)


def test_depth_l1_masks_invalid():
    pred = torch.tensor([1.0, 5.0, 3.0]).view(1, 1, 1, 3)
    target = torch.tensor([2.0, 0.0, 4.5]).view(1, 1, 1, 3)
    assert math.isclose(float(depth_l1(pred, target)), (1 + 1.5) / 2, rel_tol=1e-6)


def test_cross_entropy_ignore_and_all_ignored():
    logits = torch.zeros(1, 3, 1, 2, requires_grad=True)
    target = torch.tensor([[[1, 255]]])
    assert math.isclose(float(cross_entropy(logits, target).detach()), math.log(3), rel_tol=1e-6)
    empty = cross_entropy(logits, torch.full((1, 1, 2), 255))
    empty.backward()
    assert float(empty.detach()) == 0 and torch.isfinite(logits.grad).all()


def test_multi_task_loss_uses_same_weights_for_initial_and_final():
    pred = torch.tensor([1.0]).view(1, 1, 1, 1)
    target = torch.tensor([3.0]).view(1, 1, 1, 1)  # L1 = 2
    outputs = {"final": {"depth": pred}, "initial": [{"depth": pred, "edge": torch.zeros(1, 1, 1, 1)}]}
    targets = {"depth": target, "edge": torch.ones(1, 1, 1, 1)}
    total, terms = MultiTaskLoss({"depth": 2.0, "edge": 50.0})(outputs, targets)
    assert set(terms) == {"final/depth", "initial0/depth", "initial0/edge"}
    assert math.isclose(float(total), 2 * 2 + 2 * 2 + 50 * float(terms["initial0/edge"]), rel_tol=1e-6)
