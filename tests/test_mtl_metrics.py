"""Known-answer tests of the dense metrics, the boundary matching, Δ_MTL and the FLOP counter."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from downstream.mtl.delta import MissingSingleTaskResults, delta_mtl, load_single_task_results, record_single_task_result
from downstream.mtl.edge_metric import EdgeMeter, match_boundaries, thin
from downstream.mtl.flops import count_flops, count_parameters, model_cost, relative_report
from downstream.mtl.metrics import DepthMeter, NormalsMeter, SaliencyMeter, SegmentationMeter


def test_miou_from_dataset_level_counts():
    meter = SegmentationMeter(3)
    meter.update(torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 0, 1, 1]]))
    meter.update(torch.tensor([[2, 2]]), torch.tensor([[255, 2]]))  # ignored pixel does not count as FP
    # class 0: TP1 FN1 -> 1/2; class 1: TP2 FP1 -> 2/3; class 2: TP1 -> 1
    assert math.isclose(meter.compute()["miou"], 100 * (0.5 + 2 / 3 + 1) / 3, rel_tol=1e-9)


def test_miou_skips_classes_absent_everywhere():
    meter = SegmentationMeter(5)
    meter.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert meter.compute()["miou"] == 100.0


def test_saliency_maxf_and_miou_at_best_threshold():
    meter = SaliencyMeter()
    meter.update(torch.tensor([0.95, 0.5, 0.5, 0.1]), torch.tensor([1.0, 1, 0, 0]))
    # t < 0.5: P=2/3 R=1 F=0.8 IoU=2/3; t >= 0.5: P=1 R=1/2 F=2/3 IoU=1/2
    out = meter.compute()
    assert math.isclose(out["maxf"], 80.0, rel_tol=1e-6)
    assert math.isclose(out["miou"], 100 * 2 / 3, rel_tol=1e-6)
    assert out["threshold"] < 0.5


def test_saliency_averages_precision_recall_over_images():
    meter = SaliencyMeter(thresholds=np.array([0.5]))
    meter.update(torch.tensor([0.9, 0.9]), torch.tensor([1.0, 0]))  # P=1/2 R=1
    meter.update(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 1]))  # P=1 R=1/2
    p, r = 0.75, 0.75
    assert math.isclose(meter.compute()["maxf"], 100 * 2 * p * r / (p + r), rel_tol=1e-6)


def _rotated(deg):
    a = math.radians(deg)
    return [math.sin(a), 0.0, math.cos(a)]


def test_normals_angles():
    gt = torch.tensor([[0.0, 0, 1]] * 3 + [[0.0, 0, 0]]).T.reshape(3, 1, 4)
    pred = torch.tensor([_rotated(10), _rotated(20), _rotated(40), [1.0, 0, 0]]).T.reshape(3, 1, 4) * 3  # unnormalised
    meter = NormalsMeter()
    meter.update(pred, gt)
    out = meter.compute()
    assert math.isclose(out["mean"], 70 / 3, rel_tol=1e-5)
    assert abs(out["median"] - 20) < 2e-3
    assert math.isclose(out["rmse"], math.sqrt((100 + 400 + 1600) / 3), rel_tol=1e-5)
    assert math.isclose(out["within_11.25"], 100 / 3, rel_tol=1e-6)
    assert math.isclose(out["within_22.5"], 200 / 3, rel_tol=1e-6)
    assert math.isclose(out["within_30"], 200 / 3, rel_tol=1e-6)


def test_depth_metrics_over_valid_pixels_of_the_set():
    meter = DepthMeter()
    meter.update(torch.tensor([2.0, 7.0]), torch.tensor([1.0, 0.0]))  # second pixel invalid
    meter.update(torch.tensor([2.0]), torch.tensor([4.0]))
    out = meter.compute()
    assert math.isclose(out["rmse"], math.sqrt((1 + 4) / 2), rel_tol=1e-9)
    assert math.isclose(out["abs_rel"], (1 + 0.5) / 2, rel_tol=1e-9)
    assert math.isclose(out["log_rmse"], math.log(2), rel_tol=1e-9)
    assert out["delta1"] == 0.0 and out["delta3"] == 0.0  # both ratios are 2 > 1.25^3


def test_thinning_gives_one_pixel_lines():
    mask = np.zeros((20, 24), bool)
    mask[5:10, 2:22] = True
    thinned = thin(mask)
    assert thinned.any() and thinned.sum() < mask.sum()
    assert (thinned.sum(axis=0) <= 1).all()  # at most one pixel per column: a horizontal line
    assert thin(np.zeros((3, 5, 5), bool)).sum() == 0


def test_boundary_matching_is_one_to_one_within_tolerance():
    gt = np.zeros((20, 20), bool)
    gt[:, 10] = True
    two_lines = np.zeros_like(gt)
    two_lines[:, 9] = two_lines[:, 11] = True
    assert match_boundaries(two_lines, gt, max_dist=1.0) == 20  # each GT pixel matches once
    far = np.zeros_like(gt)
    far[:, 13] = True
    assert match_boundaries(far, gt, max_dist=1.5) == 0
    assert match_boundaries(far, gt, max_dist=3.0) == 20


def test_edge_ods():
    gt = torch.zeros(20, 20)
    gt[:, 10] = 1
    tolerance = 1.5 / math.hypot(20, 20)  # 1.5 px
    shifted = torch.zeros(20, 20)
    shifted[:, 11] = 0.8
    meter = EdgeMeter(tolerance=tolerance)
    meter.update(shifted, gt)
    assert math.isclose(meter.compute()["odsf"], 100.0)
    half = torch.zeros(20, 20)
    half[:10, 10] = 0.6  # P = 1, R = 1/2
    meter = EdgeMeter(tolerance=tolerance)
    meter.update(half, gt)
    assert math.isclose(meter.compute()["odsf"], 100 * 2 / 3, rel_tol=1e-9)
    both = torch.zeros(20, 20)
    both[:, 9] = both[:, 11] = 0.7  # 40 predicted pixels, only 20 can be matched one-to-one
    meter = EdgeMeter(tolerance=tolerance)
    meter.update(both, gt)
    assert math.isclose(meter.compute()["odsf"], 100 * 2 * 0.5 * 1 / 1.5, rel_tol=1e-9)


def test_edge_ods_picks_one_threshold_for_the_dataset():
    gt = torch.zeros(10, 10)
    gt[:, 5] = 1
    meter = EdgeMeter(tolerance=0.01)
    strong, weak = torch.zeros(10, 10), torch.zeros(10, 10)
    strong[:, 5] = 0.9
    weak[:, 5] = 0.3
    meter.update(strong, gt)
    meter.update(weak, gt)
    out = meter.compute()
    assert math.isclose(out["odsf"], 100.0) and out["threshold"] < 0.3


def test_delta_mtl_signs():
    st = {"semseg": {"miou": 40.0}, "depth": {"rmse": 0.5}}
    assert math.isclose(delta_mtl({"semseg": {"miou": 44.0}, "depth": {"rmse": 0.55}}, st, ["semseg", "depth"]), 0.0, abs_tol=1e-9)
    assert math.isclose(delta_mtl({"semseg": {"miou": 44.0}, "depth": {"rmse": 0.45}}, st, ["semseg", "depth"]), 10.0)
    assert math.isclose(delta_mtl({"semseg": {"miou": 36.0}, "depth": {"rmse": 0.55}}, st, ["semseg", "depth"]), -10.0)
    normals = delta_mtl({"normals": {"mean": 18.0}}, {"normals": {"mean": 20.0}}, ["normals"])
    assert math.isclose(normals, 10.0)  # lower angle error is better


def test_delta_mtl_of_a_zero_reference_is_a_clear_error():
    from downstream.mtl.delta import UndefinedDelta

    with pytest.raises(UndefinedDelta, match="single-task semseg miou is 0"):
        delta_mtl({"semseg": {"miou": 3.0}, "depth": {"rmse": 1.0}},
                  {"semseg": {"miou": 0.0}, "depth": {"rmse": 1.2}}, ["semseg", "depth"])


def test_delta_mtl_missing_reference(tmp_path):
    with pytest.raises(MissingSingleTaskResults, match="single_task_depth"):
        delta_mtl({"semseg": {"miou": 1.0}, "depth": {"rmse": 1.0}}, {"semseg": {"miou": 1.0}}, ["semseg", "depth"])
    with pytest.raises(MissingSingleTaskResults, match="does not exist"):
        load_single_task_results(tmp_path / "nope.json")
    path = tmp_path / "st.json"
    record_single_task_result(path, "semseg", {"miou": 30.0})
    record_single_task_result(path, "depth", {"rmse": 0.7}, extra={"params": 5})
    assert json.loads(path.read_text()) == {"semseg": {"miou": 30.0}, "depth": {"rmse": 0.7, "params": 5}}


def test_flop_counter_known_answer():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, (10, 10)) == 2 * 3 * 8 * 9 * 100
    mlp = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    assert count_flops(mlp, (4, 4)) == 2 * 3 * 4 * 16 + 2 * 64 * 5
    assert count_parameters(conv) == 3 * 8 * 9 + 8
    cost = model_cost(lambda: nn.Conv2d(3, 8, 3, padding=1), (10, 10))  # built on the meta device
    assert cost == {"params": 224, "flops": 43200}
    report = relative_report("x", {"params": 150, "flops": 50}, {"a": {"params": 100, "flops": 50}, "b": {"params": 100, "flops": 50}})
    assert report["params_rel"] == -25.0 and report["flops_rel"] == -50.0



def _record_many(path: str, tasks) -> None:
    for t in tasks:
        record_single_task_result(path, t, {"miou": float(len(t))})


def test_single_task_results_written_concurrently_keep_every_task(tmp_path):
    """Parallel single-task runs share one --single-task-results file: none may drop another's task."""
    import multiprocessing as mp

    path = str(tmp_path / "st.json")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_record_many, args=(path, [f"task{i}_{k}" for k in range(15)])) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(load_single_task_results(path)) == sorted(f"task{i}_{k}" for i in range(4) for k in range(15))
