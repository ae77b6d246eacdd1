"""Loss balancers: known answers, deep supervision, DDP agreement, and runs inside finetune_mtl.py."""
import itertools
import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from downstream.mtl.balancers import SharedParts, balancer_names, build_balancer
from downstream.mtl.balancers.auto_magnitude import AutoMagnitude
from downstream.mtl.balancers.cagrad import cagrad_coefficients
from downstream.mtl.balancers.dtp import DTP, dtp_weights, task_kpi
from downstream.mtl.balancers.dwa import DWA
from downstream.mtl.balancers.gradnorm import GradNorm
from downstream.mtl.balancers.mgda import min_norm_coefficients
from downstream.mtl.balancers.pcgrad import pcgrad_projection
from downstream.mtl.balancers.uncertainty import Uncertainty
from downstream.mtl.losses import MultiTaskLoss
from selfsup.config import ConfigError

ALL = ["fixed", "uncertainty", "gradnorm", "dwa", "dtp", "mgda", "mgda_ub", "auto_magnitude", "pcgrad", "cagrad"]


class Toy(nn.Module):
    """A shared encoder (no BN: batch-size independent) and one 1x1 head per task; real task names and losses."""

    def __init__(self, tasks=("semseg", "depth"), aux=()):
        super().__init__()
        self.tasks, self.aux = tasks, aux
        self.encoder = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 1))
        out = {"semseg": 3, "depth": 1, "normals": 3, "edge": 1}
        self.heads = nn.ModuleDict({t: nn.Conv2d(6, out[t], 1) for t in (*tasks, *aux)})

    def forward(self, x):
        z = self.encoder(x)
        return {"final": {t: self.heads[t](z) for t in self.tasks},
                "initial": [{t: self.heads[t](z) for t in self.aux}] if self.aux else []}


def toy_batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 6, 6, generator=g)
    targets = {"semseg": torch.randint(0, 3, (n, 6, 6), generator=g),
               "depth": torch.rand(n, 1, 6, 6, generator=g) * 3 + 0.5,
               "edge": (torch.rand(n, 1, 6, 6, generator=g) > 0.8).float()}
    return images, targets


def test_unknown_balancer_and_argument_are_clear_errors():
    assert sorted(ALL) == balancer_names()
    with pytest.raises(ConfigError, match="unknown balancer 'nope'; known: auto_magnitude, cagrad, dtp"):
        build_balancer("nope", tasks=["semseg"])
    with pytest.raises(ConfigError, match="'dwa' has no parameter tau; it takes: temperature"):
        build_balancer("dwa", tasks=["semseg"], args={"tau": 1})
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        build_balancer("dwa", tasks=["semseg"], args={"temperature": 0})
    for name, known in (("cagrad", "paper, libmtl"), ("uncertainty", "paper, libmtl"), ("mgda", "paper, published"),
                        ("mgda_ub", "paper, published"), ("gradnorm", "paper, normalized")):
        with pytest.raises(ConfigError, match=f"optim.balancer_args of '{name}': {name} convention must be one of {known}, got 'x'"):
            build_balancer(name, tasks=["semseg"], args={"convention": "x"})
    with pytest.raises(ConfigError, match="mgda normalize must be one of none, l2, loss, loss\\+, got 'L2'"):
        build_balancer("mgda", tasks=["semseg"], args={"normalize": "L2"})


@pytest.mark.parametrize("T", [2, 3, 4])
def test_mgda_min_norm_point_matches_brute_force(T):
    g = torch.randn(T, 7, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    G = g @ g.T
    alpha = min_norm_coefficients(G)
    assert alpha.min() >= 0 and math.isclose(float(alpha.sum()), 1.0, rel_tol=1e-9)
    n = 36
    grid = min(float(w @ G @ w) for c in itertools.product(range(n + 1), repeat=T - 1) if sum(c) <= n
               for w in [torch.tensor([*c, n - sum(c)], dtype=torch.float64) / n])
    value = float(alpha @ G @ alpha)
    assert value <= grid + 1e-9
    # optimality (KKT): no task gradient points further down than the min-norm point itself
    assert (G @ alpha >= value - 1e-6).all()


def test_mgda_two_tasks_closed_form():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # min-norm point: (0.8, 0.4) = 0.8 g1 + 0.2 g2
    assert torch.allclose(min_norm_coefficients(g @ g.T), torch.tensor([0.8, 0.2], dtype=torch.float64))


def test_gradnorm_moves_weights_toward_equal_gradient_norms():
    torch.manual_seed(0)
    model = Toy()
    criterion = MultiTaskLoss({"semseg": 1.0, "depth": 20.0})  # depth's gradients are much larger
    balancer = GradNorm(["semseg", "depth"], alpha=1.5, lr=0.05)
    shared = SharedParts.of(model)
    images, targets = toy_batch()
    spreads = []
    for step in range(6):  # same batch, no parameter update: only the weights move
        model.zero_grad()
        losses, _ = criterion.per_task(model(images), targets)
        norms = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared.last_layer,
                                                                                   retain_graph=True)]).norm()
                             for t in balancer.tasks])
        spreads.append(float((balancer.lambdas * norms).max() / (balancer.lambdas * norms).min()))
        balancer.backward(losses, shared=shared, step=step)
        assert math.isclose(float(balancer.lambdas.sum()), 2.0, rel_tol=1e-5)
    assert spreads[-1] < spreads[0] - 0.1
    w = balancer.weights()
    assert w["semseg"] > 1 > w["depth"]  # the task with the smaller gradients is up-weighted


def test_dwa_matches_formula():
    dwa = DWA(["a", "b"], temperature=2.0)
    epochs = [[1.0, 2.0], [0.5, 2.0], [0.4, 1.0]]
    for e, values in enumerate(epochs):
        for _ in range(3):
            dwa.combine(torch.tensor(values), step=0, epoch=e)
        if e < 2:
            assert torch.equal(dwa.lambdas, torch.ones(2))  # the first two epochs: λ = 1
    assert torch.allclose(dwa.lambdas, 2 * torch.softmax(torch.tensor([0.5 / 1.0, 2.0 / 2.0]) / 2.0, 0))  # epoch 2
    dwa.combine(torch.tensor([1.0, 1.0]), step=0, epoch=3)
    r = torch.tensor([0.4 / 0.5, 1.0 / 2.0])
    assert torch.allclose(dwa.lambdas, 2 * torch.softmax(r / 2.0, 0))
    restored = DWA(["a", "b"])
    restored.load_state_dict(dwa.state_dict())
    restored.combine(torch.tensor([1.0, 1.0]), step=0, epoch=3)  # same epoch: weights unchanged after a resume
    assert torch.allclose(restored.lambdas, dwa.lambdas)


def test_dtp_matches_formula_and_ranks_the_harder_task_higher():
    dtp = DTP(["easy", "hard"], gamma={"hard": 2.0}, momentum=0.9)
    dtp.combine(torch.ones(2), step=0, epoch=0, kpi=torch.tensor([0.9, 0.3]))
    k = torch.tensor([0.9, 0.3])
    assert torch.allclose(dtp.lambdas, torch.stack([-(1 - k[0]) * torch.log(k[0]), -(1 - k[1]) ** 2 * torch.log(k[1])]))
    assert dtp.lambdas[1] > dtp.lambdas[0]
    dtp.combine(torch.ones(2), step=1, epoch=0, kpi=torch.tensor([0.5, 0.5]))  # moving average
    k = 0.9 * k + 0.1 * torch.tensor([0.5, 0.5])
    assert torch.allclose(dtp.kappa, k)
    assert torch.allclose(dtp.lambdas, dtp_weights(k, torch.tensor([1.0, 2.0])))


def test_dtp_task_kpis_known_values():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1, 0, :3] = 1  # predicts 1, 1, 1, 0
    assert math.isclose(float(task_kpi("semseg", logits, torch.tensor([[[1, 0, 1, 255]]]))), 2 / 3, rel_tol=1e-6)
    depth = task_kpi("depth", torch.tensor([1.0, 2.0, 3.0, 9.0]).view(1, 1, 1, 4), torch.tensor([1.1, 3.0, 0.0, 9.5]).view(1, 1, 1, 4))
    assert math.isclose(float(depth), 2 / 3, rel_tol=1e-6)  # 1.1/1 and 9.5/9 within 1.25, 3/2 not, gt 0 invalid
    # edge: 1 of 2 edge pixels and 2 of 2 non-edge pixels right -> (0.5 + 1) / 2
    edge = task_kpi("edge", torch.tensor([5.0, -5.0, -5.0, -5.0]).view(1, 1, 1, 4), torch.tensor([1.0, 1, 0, 0]).view(1, 1, 1, 4))
    assert math.isclose(float(edge), 0.75)


def test_uncertainty_gradient_is_analytic():
    unc = Uncertainty(["semseg", "depth"], init_log_var=0.3)
    losses = {"semseg": torch.tensor(2.0, requires_grad=True), "depth": torch.tensor(0.7, requires_grad=True)}
    unc.backward(losses)
    s, L, c = 0.3, torch.tensor([2.0, 0.7]), torch.tensor([1.0, 0.5])  # depth is a regression task: ½ exp(−s) L
    assert torch.allclose(unc.log_vars.grad, -c * math.exp(-s) * L + 0.5)
    assert torch.allclose(losses["depth"].grad, torch.tensor(0.5 * math.exp(-s)))


def test_auto_magnitude_equalises_the_measured_magnitudes():
    bal = AutoMagnitude(["a", "b", "c"], iters=4)
    g = torch.Generator().manual_seed(0)
    seen = []
    for step in range(4):
        losses = torch.tensor([1.0, 10.0, 300.0]) * (1 + 0.2 * torch.rand(3, generator=g))
        seen.append(losses)
        assert float(bal.combine(losses, step=step, epoch=0)) == pytest.approx(float(losses.sum()))  # warm-up: λ = 1
    weighted = bal.lambdas * torch.stack(seen).mean(0)
    assert torch.allclose(weighted, weighted.mean().expand(3), rtol=1e-5)
    assert math.isclose(float(weighted.sum()), float(torch.stack(seen).mean(0).sum()), rel_tol=1e-5)


def test_pcgrad_removes_the_conflicting_component():
    g = torch.randn(2, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g[1] = -g[0] + 0.3 * g[1]  # conflicting
    assert float(g[0] @ g[1]) < 0
    C = pcgrad_projection(g @ g.T, torch.Generator().manual_seed(0))
    projected = C @ g
    dots = projected @ g.T
    assert (dots >= -1e-9).all()  # each projected gradient no longer conflicts with the other task
    h = torch.randn(3, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64).abs()  # no conflict
    assert torch.allclose(pcgrad_projection(h @ h.T, torch.Generator().manual_seed(0)), torch.eye(3, dtype=torch.float64))


def test_cagrad_with_c0_is_the_summed_gradient_and_worst_case_improves_with_c():
    model = Toy()
    images, targets = toy_batch()
    losses, _ = MultiTaskLoss({"semseg": 1.0, "depth": 1.0}).per_task(model(images), targets)
    shared = SharedParts.of(model)
    expected = [torch.autograd.grad(losses[t], shared.params, retain_graph=True) for t in ("semseg", "depth")]
    build_balancer("cagrad", tasks=["semseg", "depth"], args={"c": 0.0}).backward(losses, shared=shared)
    for p, a, b in zip(shared.params, *expected):  # T × the mean: the gradient of Σ L_t, as fixed
        assert torch.allclose(p.grad, a + b, atol=1e-6)
    head = model.heads["depth"].weight
    assert head.grad is not None and head.grad.abs().sum() > 0  # decoders get their plain task gradients
    g = torch.tensor([[1.0, 0.0], [-0.8, 0.3]], dtype=torch.float64)
    d0, d4 = (cagrad_coefficients(g @ g.T, c, rescale=False) @ g for c in (0.0, 0.4))
    assert float((g @ d4).min()) > float((g @ d0).min())  # a better worst-task improvement than the mean


def test_balancer_weight_multiplies_every_term_of_a_task():
    """L_t = w_t·(final + Σ initial scales); λ_t multiplies the whole L_t; auxiliary tasks keep their config weight."""
    final, init0, init1 = (torch.tensor([[[[1.0]]]], requires_grad=True) for _ in range(3))
    edge = torch.zeros(1, 1, 1, 1, requires_grad=True)
    outputs = {"final": {"depth": final}, "initial": [{"depth": init0, "edge": edge}, {"depth": init1}]}
    targets = {"depth": torch.full((1, 1, 1, 1), 3.0), "edge": torch.ones(1, 1, 1, 1)}
    criterion = MultiTaskLoss({"depth": 2.0, "edge": 50.0})
    losses, terms = criterion.per_task(outputs, targets)
    assert set(terms) == {"final/depth", "initial0/depth", "initial1/depth", "initial0/edge"}
    assert math.isclose(float(losses["depth"].detach()), 2.0 * (2 + 2 + 2))
    assert math.isclose(float(criterion(outputs, targets)[0].detach()), float((losses["depth"] + losses["edge"]).detach()), rel_tol=1e-6)
    bal = build_balancer("fixed", tasks=["depth"])
    bal.lambdas.fill_(3.0)
    bal.backward({"depth": losses["depth"]}, extra=losses["edge"])
    for p in (final, init0, init1):  # d/dp of 3 · 2 · |p − 3| = −6
        assert torch.allclose(p.grad, torch.tensor(-6.0))
    expected_edge = torch.autograd.grad(criterion.per_task({"final": {}, "initial": [{"edge": edge}]}, targets)[0]["edge"], edge)[0]
    assert torch.allclose(edge.grad, expected_edge)  # 50 × the BCE gradient, no balancer weight


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from selfsup.distributed import cleanup, init_distributed
    from downstream.mtl.engine import balanced_step
    init_distributed(device_type="cpu")
    images, targets = toy_batch(n=4, seed=0)
    images, targets = images[2 * rank:2 * rank + 2], {k: v[2 * rank:2 * rank + 2] for k, v in targets.items()}
    result = {}
    for name in ["mgda", "pcgrad", "cagrad", "gradnorm", "mgda_ub", "uncertainty", "dtp"]:
        torch.manual_seed(0)  # same init on both ranks
        net = Toy(aux=("edge",))
        model = nn.parallel.DistributedDataParallel(net)
        bal = build_balancer(name, tasks=["semseg", "depth"])
        shared = SharedParts.of(net, capture_representation=bal.needs_representation)
        opt = torch.optim.SGD([*net.parameters(), *bal.parameters()], lr=0.1)
        for step in range(2):
            opt.zero_grad()
            balanced_step(model, images, targets, MultiTaskLoss({"semseg": 1.0, "depth": 1.0, "edge": 5.0}), bal,
                          shared=shared, step=step, epoch=0, device=torch.device("cpu"))
            opt.step()
        result[name] = {"weights": bal.lambdas.clone(), "params": torch.cat([p.detach().reshape(-1) for p in net.parameters()])}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    cleanup()


def _reference(name):
    """One process on the whole batch: what both ranks together must compute."""
    from downstream.mtl.engine import balanced_step
    images, targets = toy_batch(n=4, seed=0)
    torch.manual_seed(0)
    net = Toy(aux=("edge",))
    bal = build_balancer(name, tasks=["semseg", "depth"])
    shared = SharedParts.of(net, capture_representation=bal.needs_representation)
    opt = torch.optim.SGD([*net.parameters(), *bal.parameters()], lr=0.1)
    for step in range(2):
        opt.zero_grad()
        balanced_step(net, images, targets, MultiTaskLoss({"semseg": 1.0, "depth": 1.0, "edge": 5.0}), bal,
                      shared=shared, step=step, epoch=0, device=torch.device("cpu"))
        opt.step()
    return bal.lambdas, torch.cat([p.detach().reshape(-1) for p in net.parameters()])


@pytest.mark.timeout(120)
def test_ddp_two_processes_same_weights_and_single_process_result(tmp_path):
    from selfsup.launcher import free_port
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in r0:
        assert torch.equal(r0[name]["weights"], r1[name]["weights"]), name
        assert torch.allclose(r0[name]["params"], r1[name]["params"], atol=1e-6), name
        weights, params = _reference(name)  # gradients averaged once = the whole batch's gradients
        assert torch.allclose(r0[name]["weights"], weights, atol=1e-4), name
        assert torch.allclose(r0[name]["params"], params, atol=1e-5), name
    assert not torch.equal(r0["mgda"]["weights"], torch.ones(2))


TINY = """
epochs: 1
max_iters_per_epoch: 2
progress: false
vis_every: 0
log_every: 1
data:
  batch_size: 2
  eval_batch_size: 4
  num_workers: 0
  max_train_images: 4
  max_val_images: 2
model:
  backbone: resnet_tiny
  fpn_channels: 8
  head_channels: 8
  task_channels: 4
eval:
  edge_thresholds: 3
"""


@pytest.mark.parametrize("arch", ["mtl_baseline", "mti_net"])
@pytest.mark.parametrize("name", ALL)
def test_every_balancer_trains_inside_finetune_mtl_and_resumes(tmp_path, embedded_root, name, arch):
    from downstream.finetune_mtl import main

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "run"
    args = ["--config", str(config), "--data-root", str(embedded_root / "nyud"), "--output-dir", str(out),
            "--balancer", name, f"model.arch={arch}", "data.auxiliary_tasks=[edge]",
            "optim.balancer_args={iters: 1}" if name == "auto_magnitude" else "optim.balancer_args={}"]
    first = main(args)
    assert first["balancer"] == name and set(first["balancer_weights"]) == {"semseg", "depth"}
    assert all(math.isfinite(w) for w in first["balancer_weights"].values())
    state = torch.load(out / "checkpoint.pth", weights_only=True)["balancer"]
    resumed = main(args[:-1] + ["epochs=2", "allow_config_change=true", args[-1]])  # resumes after epoch 1 with the saved balancer state
    assert "resumed from" in (out / "log_rank0.txt").read_text()
    assert resumed["balancer"] == name and resumed["epochs"] == 2
    if name in ("fixed", "dwa"):  # DWA needs two finished epochs before its weights move
        assert resumed["balancer_weights"] == {"semseg": 1.0, "depth": 1.0}
    if name == "auto_magnitude":  # fixed after its measurement: the resumed run keeps the checkpoint's weights
        assert resumed["balancer_weights"] == pytest.approx(dict(zip(["semseg", "depth"], state["lambdas"].tolist())))
    assert json.loads((out / "results.json").read_text())["balancer_weights"] == resumed["balancer_weights"]
