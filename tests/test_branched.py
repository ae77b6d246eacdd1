"""Branched multi-task networks: affinities, tree enumeration and search, the built network, the entry points."""
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_mtl_yaml
from downstream.mtl.affinity import principal_eigenvector, rdm, rsa_affinity, spearman, tournament_matrix, transfer_affinity
from downstream.mtl.branched import component_sizes, pooling_above
from downstream.mtl.flops import count_flops, count_parameters
from downstream.mtl.models import build_model
from downstream.mtl.tasks import TaskSet
from downstream.mtl.tree_search import (Candidate, beam_search, budget_search, canonical, cheapest, clustering_cost,
                                        complexity_cost, enumerate_trees, refines, set_partitions, validate_tree)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(backbone="resnet_tiny", fpn_channels=16, head_channels=16)
PASCAL3 = TaskSet("pascal_context", ("semseg", "sal", "normals"))


def test_rdm_and_spearman_by_hand():
    # rows: centred, pairwise Pearson -1, 0.5, -0.5
    feats = np.array([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]])
    np.testing.assert_allclose(rdm(feats), [[0, 2, 0.5], [2, 0, 1.5], [0.5, 1.5, 0]], atol=1e-12)
    # ranks 1 2 3 4 vs 1 3 2 4: 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 30, 20, 40])) == pytest.approx(0.8)
    # ties get average ranks: (1, 2.5, 2.5, 4) vs (1, 2, 3, 4) -> Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert spearman(np.array([1.0, 2, 2, 3]), np.array([1.0, 2, 3, 4])) == pytest.approx(4.5 / np.sqrt(4.5 * 5))
    # affinity = Spearman of the upper triangles: [2, .5, 1.5] vs [1, 0, 3] -> ranks (3,1,2) vs (2,1,3): 0.5
    other = np.array([[0, 1, 0], [1, 0, 3], [0, 3, 0]], dtype=float)
    np.testing.assert_allclose(rsa_affinity([rdm(feats), other]), [[1, 0.5], [0.5, 1]])


def test_tournament_matrix_and_principal_eigenvector_by_hand():
    losses = np.array([[1.0, 1.0, 3.0, 0.5], [2.0, 0.5, 1.0, 1.0]])  # encoder a wins on samples 0 and 3
    np.testing.assert_allclose(tournament_matrix(losses), [[0, 0.5], [0.5, 0]])
    # [[0, p], [q, 0]]: eigenvalue sqrt(pq), eigenvector (sqrt p, sqrt q)
    p, q = 0.8, 0.2
    np.testing.assert_allclose(principal_eigenvector(np.array([[0, p], [q, 0]])), [2 / 3, 1 / 3])
    W = np.array([[0, 0.9, 0.7], [0.1, 0, 0.6], [0.3, 0.4, 0]])
    v = principal_eigenvector(W)
    lam = (W @ v)[0] / v[0]
    np.testing.assert_allclose(W @ v, lam * v, atol=1e-10)
    assert v.sum() == pytest.approx(1.0) and (v > 0).all() and v[0] > v[1]
    A = transfer_affinity(np.stack([losses, losses[::-1]]))
    np.testing.assert_allclose(A, A.T)


def _brute_force_trees(tasks, depth):
    partitions = [canonical(p, tasks) for p in set_partitions(tasks)]
    root = (tuple(tasks),)
    return {chain for chain in itertools.product(partitions, repeat=depth)
            if all(refines(chain[d], chain[d - 1] if d else root) for d in range(depth))}


@pytest.mark.parametrize("n", [3, 4])
def test_enumerated_trees_equal_brute_force(n):
    tasks = tuple("abcd"[:n])
    assert len(list(set_partitions(tasks))) == {3: 5, 4: 15}[n]  # Bell numbers
    trees = enumerate_trees(tasks, 3)
    assert len(trees) == len(set(trees)) == len(_brute_force_trees(tasks, 3))
    assert set(trees) == _brute_force_trees(tasks, 3)


def _random_dissimilarity(n, depth, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, (depth, n, n))
    return 1 - (a + a.transpose(0, 2, 1)) / 2


def test_budget_respected_and_minimum_cost():
    tasks = PASCAL3.main
    model = build_model("branched", tasks=PASCAL3, branching=[[list(tasks)]] * 4, **TINY)
    components = component_sizes(model, (32, 32))
    trees = enumerate_trees(tasks, 4)
    size = {t: components.tree_size(t) for t in trees}
    dissim = _random_dissimilarity(3, 4)
    smallest, largest = min(s["params"] for s in size.values()), max(s["params"] for s in size.values())
    for budget in np.linspace(smallest, largest, 5):
        best, candidates = budget_search(trees, dissim, tasks, size, budget=budget)
        assert best.params <= budget
        assert best.cost == pytest.approx(min(clustering_cost(t, dissim, tasks) for t in trees if size[t]["params"] <= budget))
    assert budget_search(trees, dissim, tasks, size, budget=smallest - 1)[0] is None
    best, _ = budget_search(trees, dissim, tasks, size, budget=1e12, measure="flops")
    assert best.cost == pytest.approx(0.0)  # unlimited: all separate, every cluster a singleton


def test_ties_go_to_the_fewer_parameters():
    """Equal affinities everywhere: every tree costs 0 up to rounding noise; the search shares as much as it can."""
    tasks = PASCAL3.main
    model = build_model("branched", tasks=PASCAL3, branching=[[list(tasks)]] * 4, **TINY)
    trees = enumerate_trees(tasks, 4)
    size = {t: component_sizes(model, (32, 32)).tree_size(t) for t in trees}
    dissim = np.zeros((4, 3, 3))
    dissim[:, 0, 1] = dissim[:, 1, 0] = 1e-16  # 1 - Spearman of identical rankings, as computed
    all_shared = tuple(((tuple(tasks),),) * 4)
    for measure in ("params", "flops"):
        best, _ = budget_search(trees, dissim, tasks, size, budget=1e12, measure=measure)
        assert best.tree == all_shared and best.params == min(s["params"] for s in size.values())
    (tree, _), *_ = beam_search(tasks, dissim, pooling_above=[3, 2, 1, 0], alpha=0.0, beam=3)
    assert tree == all_shared
    # equal cost and equal size: the enumeration order decides, whatever order the candidates come in
    twins = [Candidate(t, 0.0, 1, 1) for t in trees[:5]]
    assert cheapest(twins[::-1], order=trees).tree == trees[0] == cheapest(twins, order=trees).tree


def test_beam_search_with_large_beam_equals_exhaustive():
    tasks = ("a", "b", "c", "d")
    dissim = _random_dissimilarity(4, 3, seed=1)
    pools = [2, 1, 0]
    for alpha in (0.0, 0.05, 0.3):
        exhaustive = min(clustering_cost(t, dissim, tasks) + complexity_cost(t, pools, alpha) for t in enumerate_trees(tasks, 3))
        tree, cost = beam_search(tasks, dissim, pooling_above=pools, alpha=alpha, beam=10_000)[0]
        assert cost == pytest.approx(exhaustive)
        assert cost == pytest.approx(clustering_cost(tree, dissim, tasks) + complexity_cost(tree, pools, alpha))
        greedy = beam_search(tasks, dissim, pooling_above=pools, alpha=alpha, beam=1)[0][1]
        assert greedy >= cost - 1e-12


def test_pooling_above_branch_points():
    from selfsup.backbones import build_backbone

    assert pooling_above(build_backbone("resnet_tiny"), [1, 2, 3, 4]) == [3, 2, 1, 0]
    assert pooling_above(build_backbone("resnet_tiny", output_stride=8), [1, 2, 3, 4]) == [1, 0, 0, 0]


@pytest.mark.parametrize("tree", [
    [[["semseg", "sal", "normals"]], [["semseg", "sal"], ["normals"]], [["semseg", "sal"], ["normals"]],
     [["semseg"], ["sal"], ["normals"]]],
    [[["semseg", "normals"], ["sal"]], [["semseg"], ["normals"], ["sal"]], [["semseg"], ["normals"], ["sal"]],
     [["semseg"], ["normals"], ["sal"]]],
])
def test_built_network_size_equals_prediction(tree):
    model = build_model("branched", tasks=PASCAL3, branching=tree, **TINY)
    trivial = build_model("branched", tasks=PASCAL3, branching=[[list(PASCAL3.main)]] * 4, **TINY)
    predicted = component_sizes(trivial, (32, 32)).tree_size(model.tree)
    assert predicted == {"params": count_parameters(model), "flops": count_flops(model, (32, 32))}


def _copy_into_branch(branched, backbone, neck, heads):
    branched.load_backbone_weights(backbone.state_dict())
    for n in branched.necks:
        n.load_state_dict(neck.state_dict())
    for t, h in heads.items():
        branched.heads[t].load_state_dict(h.state_dict())


def test_all_shared_tree_is_the_mtl_baseline_and_all_separate_the_single_task_set():
    tasks = PASCAL3.main
    x = torch.randn(2, 3, 32, 32)
    baseline = build_model("mtl_baseline", tasks=PASCAL3, **TINY).eval()
    shared = build_model("branched", tasks=PASCAL3, branching=[[list(tasks)]] * 4, **TINY).eval()
    assert count_parameters(shared) == count_parameters(baseline)
    assert sorted(p.shape for p in shared.parameters()) == sorted(p.shape for p in baseline.parameters())
    _copy_into_branch(shared, baseline.encoder.backbone, baseline.encoder.neck, baseline.heads)
    with torch.no_grad():
        for t in tasks:
            torch.testing.assert_close(shared(x)["final"][t], baseline(x)["final"][t])

    separate = build_model("branched", tasks=PASCAL3, branching=[[[t] for t in tasks]] * 4, **TINY).eval()
    singles = {t: build_model("single_task", tasks=TaskSet("pascal_context", (t,)), **TINY).eval() for t in tasks}
    assert count_parameters(separate) == sum(count_parameters(m) for m in singles.values())
    assert count_flops(separate, (32, 32)) == sum(count_flops(m, (32, 32)) for m in singles.values())
    for c, t in enumerate(tasks):  # branch c of every segment = task t's single-task backbone
        st = singles[t]
        pieces = [st.encoder.backbone.conv1, st.encoder.backbone.bn1]
        seg0 = separate.segments[0][c]
        seg0[0].load_state_dict(torch.nn.Sequential(*pieces, torch.nn.ReLU(), torch.nn.MaxPool2d(3)).state_dict())
        seg0[1].load_state_dict(st.encoder.backbone.layer1.state_dict())
        for d in (1, 2, 3):
            separate.segments[d][c][0].load_state_dict(getattr(st.encoder.backbone, f"layer{d + 1}").state_dict())
        separate.necks[c].load_state_dict(st.encoder.neck.state_dict())
        separate.heads[t].load_state_dict(st.heads[t].state_dict())
    with torch.no_grad():
        out = separate(x)["final"]
        for t in tasks:
            torch.testing.assert_close(out[t], singles[t](x)["final"][t])


def test_branches_start_from_the_given_weights(tmp_path):
    from selfsup.backbones import build_backbone

    backbone = build_backbone("resnet_tiny")
    path = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), path)
    tree = [[["semseg", "sal", "normals"]], [["semseg"], ["sal", "normals"]], [["semseg"], ["sal"], ["normals"]],
            [["semseg"], ["sal"], ["normals"]]]
    model = build_model("branched", tasks=PASCAL3, branching=tree, **TINY)
    model.load_backbone_weights(str(path))
    for copy in model.segments[3]:
        torch.testing.assert_close(copy[0].state_dict()["0.conv1.weight"], backbone.layer4[0].conv1.weight)
    assert len(model.segments[2]) == 3 and len(model.shared_parameters()) > 0


@pytest.mark.parametrize("tree,match", [
    ([[["semseg", "sal"]], [["semseg", "sal"]], [["semseg"], ["sal"]], [["semseg"], ["sal"]]], "not a partition"),
    ([[["semseg", "sal", "normals"]]] * 3, "one partition per branch point"),
    ([[["semseg"], ["sal", "normals"]], [["semseg", "sal"], ["normals"]], [["semseg"], ["sal"], ["normals"]],
      [["semseg"], ["sal"], ["normals"]]], "does not refine"),
])
def test_bad_tree_is_rejected(tree, match):
    with pytest.raises(ValueError, match=match):
        validate_tree(tree, PASCAL3.main, 4)
    with pytest.raises(ValueError, match="model.branching"):
        build_model("branched", tasks=PASCAL3, branching=tree, **TINY)


TINY_RUN = tiny_mtl_yaml(vis_every=0, data={"dataset": "pascal_context", "tasks": ["semseg", "sal"]},
                         model={"task_channels": None, "widths": None})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_affinity_branch_and_finetune_entry_points(tmp_path, embedded_root):
    """task_affinity.py (rsa, then transfer on the same single-task runs) -> branch.py -> finetune_mtl.py (resume)."""
    from downstream.branch import main as branch
    from downstream.finetune_mtl import main as finetune
    from downstream.task_affinity import main as task_affinity

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    root = str(embedded_root / "pascal_context")
    st = tmp_path / "st.json"
    rsa = task_affinity(["--config", str(config), "--data-root", root, "--output-dir", str(tmp_path / "rsa"),
                         "--num-images", "5", "--single-task-results", str(st), "eval.edge_thresholds=5"])
    assert rsa["affinity"].shape == (4, 2, 2) and rsa["num_images"] == 5
    np.testing.assert_allclose(np.diagonal(rsa["affinity"], axis1=1, axis2=2), 1.0)
    assert set(json.loads(st.read_text())) == {"semseg", "sal"}
    assert len(list((tmp_path / "rsa").glob("affinity_rsa_stage*.png"))) == 4
    transfer = task_affinity(["--config", str(config), "--data-root", root, "--output-dir", str(tmp_path / "tr"),
                              "--method", "transfer", "--num-images", "3", "--transfer-steps", "1",
                              "--single-task-runs", str(tmp_path / "rsa" / "single_task"), "--branch-points", "2", "4"])
    assert transfer["affinity"].shape == (2, 2, 2) and transfer["losses"].shape == (2, 2, 2, 3)

    cmd = [sys.executable, str(REPO / "downstream" / "branch.py"), "--affinity", str(tmp_path / "rsa" / "affinity.npz"),
           "--budget-params", "1e12", "--output-dir", str(tmp_path / "tree")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Pareto front" in proc.stdout and (tmp_path / "tree" / "tree.png").is_file()
    # unlimited budget: cost 0 (the all-separate tree costs 0), and among the cost-0 trees the fewest params (on
    # the embedded data the two tasks' RDMs agree at the first stages, so several trees tie): the front's last one
    chosen = json.loads((tmp_path / "tree" / "tree.json").read_text())
    assert chosen["cost"] == pytest.approx(0.0, abs=1e-9)
    assert chosen["tree"] == chosen["front"][-1]["tree"] and chosen["params"] == chosen["front"][-1]["params"]
    with pytest.raises(SystemExit, match="^error: no tree fits --budget-params 10"):
        branch(cmd[2:-4] + ["--budget-params", "10"])

    from selfsup.backbones import build_backbone
    weights = tmp_path / "backbone.pth"
    torch.save(build_backbone("resnet_tiny").state_dict(), weights)
    args = ["--config", str(tmp_path / "tree" / "branched.yaml"), "--output-dir", str(tmp_path / "run"),
            "--weights", str(weights), "--single-task-results", str(st), "eval.edge_thresholds=5"]
    first = finetune(args)
    assert first["arch"] == "branched" and isinstance(first["delta_mtl"], float)
    report = json.loads((tmp_path / "run" / "model_report.json").read_text())
    assert (report["params"], report["flops"]) == (chosen["params"], chosen["flops"])  # the search's prediction
    again = finetune(args)  # resumes from the finished run's checkpoint
    assert again["metrics"] == first["metrics"]
    with pytest.raises(SystemExit, match="error: .*model.branching"):
        finetune(args + ["model.branching=[[[semseg]],[[sal]],[[sal]],[[sal]]]", "--output-dir", str(tmp_path / "bad")])


def test_tree_and_heatmap_labels_fit(tmp_path):
    """Full task names: every label line fits its box, boxes of one row do not overlap, heat-map cells fit a name."""
    from PIL import Image

    from downstream.mtl.tree_plot import affinity_heatmap, draw_tree, heatmap_cell, text_width, tree_layout

    tasks = ("semseg", "human_parts", "sal", "normals", "edge")
    tree = ((tasks,), ((tasks[0], tasks[1], tasks[2], tasks[4]), (tasks[3],)),
            ((tasks[0], tasks[1]), (tasks[2], tasks[4]), (tasks[3],)), tuple((t,) for t in tasks))
    tree = validate_tree(tree, tasks, 4)
    boxes, (width, height) = tree_layout(tree)
    assert len(boxes) == 1 + sum(len(p) for p in tree)
    for b in boxes:
        assert 0 <= b.x0 < b.x1 <= width and b.y1 <= height
        assert all(text_width(line) <= b.x1 - b.x0 for line in b.lines)
        assert b.depth == 0 or b.lines == b.cluster  # full names, one per line
    for d in range(1, 5):
        row = sorted((b for b in boxes if b.depth == d), key=lambda b: b.x0)
        assert all(a.x1 < b.x0 for a, b in zip(row, row[1:]))
    assert heatmap_cell(tasks) >= max(text_width(t) for t in tasks)
    draw_tree(tree, tmp_path / "tree.png", level_names=["a", "b", "c", "d"])
    affinity_heatmap(np.eye(5), list(tasks), tmp_path / "heat.png", title="t")
    assert Image.open(tmp_path / "tree.png").size == (width, height)
    assert Image.open(tmp_path / "heat.png").size[0] >= 5 * heatmap_cell(tasks)


NYUD3 = TaskSet("nyud", ("semseg", "depth", "edge"))
SPLIT_AFTER_2 = [[["semseg", "depth", "edge"]]] * 2 + [[["semseg", "depth"], ["edge"]], [["semseg"], ["depth"], ["edge"]]]


def test_branched_shared_parts_are_the_all_shared_segments():
    from downstream.mtl.balancers import SharedParts

    model = build_model("branched", tasks=NYUD3, branching=SPLIT_AFTER_2, **TINY)
    parts = SharedParts.of(model, capture_representation=True)
    shared = {id(p) for d in (0, 1) for p in model.segments[d].parameters()}  # stem + stages 1, 2
    assert {id(p) for p in parts.params} == shared and len(parts.params) + len(parts.other) == len(list(model.parameters()))
    last_conv = [m for m in model.segments[1].modules() if isinstance(m, torch.nn.Conv2d)][-1]  # of stage 2
    assert [id(p) for p in parts.last_layer] == [id(p) for p in last_conv.parameters()]
    model(torch.randn(2, 3, 32, 32))
    assert [tuple(z.shape) for z in parts.representation] == [(2, 32, 4, 4)]  # stage-2 output, stride 8
    # never splitting: the shared parts are the MTL baseline's encoder (backbone + FPN; last layer its output convs)
    baseline = SharedParts.of(build_model("mtl_baseline", tasks=NYUD3, **TINY))
    whole = SharedParts.of(build_model("branched", tasks=NYUD3, branching=[[list(NYUD3.main)]] * 4, **TINY))
    assert [p.shape for p in whole.params] == [p.shape for p in baseline.params]
    assert [p.shape for p in whole.last_layer] == [p.shape for p in baseline.last_layer]
    split = build_model("branched", tasks=NYUD3, branching=[[["semseg", "depth"], ["edge"]]] + SPLIT_AFTER_2[3:] * 3, **TINY)
    with pytest.raises(ValueError, match="splits the tasks at the first branch point"):
        SharedParts.of(split)


@pytest.mark.parametrize("name", ["fixed", "uncertainty", "gradnorm", "dwa", "dtp", "mgda", "mgda_ub",
                                  "auto_magnitude", "pcgrad", "cagrad"])
def test_every_balancer_steps_a_branched_network(name):
    from downstream.mtl.balancers import build_balancer
    from downstream.mtl.engine import balanced_step
    from downstream.mtl.losses import MultiTaskLoss
    from downstream.mtl.tasks import loss_weights
    from downstream.mtl.train import balancer_shared_parts

    torch.manual_seed(0)
    model = build_model("branched", tasks=NYUD3, branching=SPLIT_AFTER_2, **TINY)
    balancer = build_balancer(name, tasks=NYUD3.main)
    cfg = type("Cfg", (), {"optim": type("O", (), {"balancer": name}), "model": type("M", (), {"arch": "branched"})})
    shared = balancer_shared_parts(cfg, model, balancer)
    assert (shared is None) == (not balancer.needs_shared)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g)
    targets = {"semseg": torch.randint(0, 40, (2, 32, 32), generator=g), "depth": torch.rand(2, 1, 32, 32, generator=g) + 1,
               "edge": (torch.rand(2, 1, 32, 32, generator=g) > 0.8).float()}
    criterion = MultiTaskLoss(loss_weights("nyud", NYUD3.main))
    total, _ = balanced_step(model, images, targets, criterion, balancer, shared=shared, step=0, epoch=0,
                             device=torch.device("cpu"), amp=False)
    assert torch.isfinite(total)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(math.isfinite(w) for w in balancer.weights().values())
    if name == "mgda_ub":
        assert [tuple(z.shape) for z in shared.representation] == [(2, 32, 4, 4)]


def test_branched_trains_with_a_gradient_balancer_through_finetune_mtl(tmp_path, embedded_root):
    from downstream.finetune_mtl import main as finetune

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    args = ["--config", str(config), "--data-root", str(embedded_root / "pascal_context"), "--weights", "none",
            "model.arch=branched", "max_iters_per_epoch=1", "eval.edge_thresholds=5"]
    tree = "model.branching=[[[semseg,sal]],[[semseg,sal]],[[semseg],[sal]],[[semseg],[sal]]]"
    result = finetune(args + [tree, "--balancer", "pcgrad", "--output-dir", str(tmp_path / "run")])
    assert result["balancer"] == "pcgrad" and all(math.isfinite(w) for w in result["balancer_weights"].values())
    separate = "model.branching=[[[semseg],[sal]],[[semseg],[sal]],[[semseg],[sal]],[[semseg],[sal]]]"
    with pytest.raises(SystemExit, match=r"^error: optim.balancer=mgda_ub needs the output of a part shared by all "
                                         r"tasks, model.arch=branched has none \(model.branching splits"):
        finetune(args + [separate, "--balancer", "mgda_ub", "--output-dir", str(tmp_path / "bad")])
