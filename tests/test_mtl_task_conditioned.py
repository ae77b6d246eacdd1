"""ASTMT, cross-stitch, NDDR, MTAN: task-specific gradients, the gradient-reversal layer, weight loading."""
import pytest
import torch

from downstream.mtl.bench import synthetic_batch
from downstream.mtl.config import MTLConfig
from downstream.mtl.losses import MultiTaskLoss, task_loss
from downstream.mtl.models import build_model
from downstream.mtl.task_conditioning import grad_reverse, task_specific_parameters
from downstream.mtl.tasks import TaskSet, loss_weights
from downstream.mtl.train import build_optimizer
from selfsup.backbones import build_backbone
from selfsup.checkpoint import CheckpointMismatchError

TINY = dict(backbone="resnet_tiny", fpn_channels=16, head_channels=16, task_channels=8)
NYUD = TaskSet("nyud", ("semseg", "depth"), ("normals",))
SIZE = (32, 32)


def test_gradient_reversal_flips_and_scales():
    x = torch.randn(3, 4, requires_grad=True)
    y = grad_reverse(x, 0.25)
    assert torch.equal(y, x)
    upstream = torch.randn(3, 4)
    y.backward(upstream)
    assert torch.allclose(x.grad, -0.25 * upstream)


@pytest.mark.parametrize("arch", ["astmt", "mtan"])
def test_task_specific_parameters_get_gradients_only_from_their_own_task(arch):
    options = {"astmt_options": MTLConfig().model.astmt} if arch == "astmt" else {}
    tasks = TaskSet("nyud", ("semseg", "depth"))
    model = build_model(arch, tasks=tasks, **TINY, **options)
    own = task_specific_parameters(model)
    assert set(own) == set(tasks.all) and all(own.values())
    x, targets = synthetic_batch(tasks, 2, SIZE, torch.device("cpu"))
    preds = model(x)["final"]
    for task in tasks.all:
        model.zero_grad(set_to_none=True)
        task_loss(task, preds[task], targets[task]).backward(retain_graph=True)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own[task]), task
        for other in set(tasks.all) - {task}:
            assert all(p.grad is None or not p.grad.any() for p in own[other]), (task, other)


def test_astmt_single_tasking_passes_and_discriminator():
    cfg = MTLConfig().model.astmt
    model = build_model("astmt", tasks=NYUD, **TINY, astmt_options=cfg)
    x, targets = synthetic_batch(NYUD, 2, SIZE, torch.device("cpu"))
    for task in NYUD.all:  # one pass per task, selected by its id
        pred, shared = model.forward_task(x, task)
        assert pred.shape == (2, NYUD.num_outputs(task), *SIZE) and shared.shape == (2, 16, 8, 8)
    with pytest.raises(KeyError, match="unknown task 'sal'"):
        model.forward_task(x, "sal")
    out = model(x)
    criterion = MultiTaskLoss(loss_weights("nyud", NYUD.all))
    total, terms = criterion(out, targets)
    task_total = sum(loss_weights("nyud", NYUD.all)[n.split("/")[1]] * v for n, v in terms.items() if "extra" not in n)
    discriminator = terms["extra/task_discriminator"]
    # CE of a 3-way classifier near chance, times the weight 0.01, summed over the 3 tasks
    assert 0.005 < float(discriminator) < 0.1 and torch.isclose(total.detach(), task_total + discriminator)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.discriminator.parameters())
    model.eval()
    with torch.no_grad():
        assert "extra_losses" not in model(x)  # evaluation runs every task, no discriminator
    off = build_model("astmt", tasks=NYUD, **TINY, astmt_options=type(cfg)(discriminator=False))
    assert off.discriminator is None and "extra_losses" not in off(x)


def test_astmt_shared_layers_train_at_lr_over_tasks():
    cfg = MTLConfig()
    cfg.model.arch, cfg.model.backbone = "astmt", "resnet_tiny"
    model = build_model("astmt", tasks=NYUD, **TINY, astmt_options=cfg.model.astmt)
    optimizer = build_optimizer(cfg, model)
    shared, own, discriminator = optimizer.param_groups
    assert shared["lr_scale"] == pytest.approx(1 / 3) and own["lr_scale"] == 1.0
    assert discriminator["lr_scale"] == pytest.approx(10 / 3)
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert id(model.encoder.backbone.conv1.weight) in {id(p) for p in shared["params"]}
    assert id(model.predict["depth"].weight) in {id(p) for p in own["params"]}


def test_astmt_loads_pretrained_backbone_into_shared_layers(tmp_path):
    torch.manual_seed(1)
    plain = build_backbone("resnet_tiny")
    path = tmp_path / "backbone.pth"
    torch.save(plain.state_dict(), path)
    model = build_model("astmt", tasks=NYUD, **TINY)
    model.load_backbone_weights(str(path))
    own = model.encoder.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in plain.state_dict().items())
    # SE gates start at 1 and adapters at 0: every task's pass reproduces the pretrained backbone
    plain.eval(), model.eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        expected = plain.forward_features(x)
        for task in NYUD.all:
            model.selector.task = task
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(model.encoder(x), expected))
    model.selector.task = None
    torch.save(build_backbone("resnet18").state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="shape"):
        model.load_backbone_weights(str(path))


def test_astmt_rejects_non_resnet_backbones():
    with pytest.raises(ValueError, match="astmt needs a ResNet backbone"):
        build_model("astmt", tasks=NYUD, backbone="hrnet18", head_channels=16)


def test_cross_stitch_with_identity_alpha_equals_single_task_networks(tmp_path):
    tasks = TaskSet("nyud", ("semseg", "depth"))
    paths, singles = {}, {}
    for i, t in enumerate(tasks.main):
        torch.manual_seed(10 + i)
        singles[t] = build_model("single_task", tasks=TaskSet("nyud", (t,)), **TINY).eval()
        paths[t] = str(tmp_path / f"{t}.pth")
        torch.save({"arch": "single_task", "model": singles[t].state_dict()}, paths[t])
    model = build_model("cross_stitch", tasks=tasks, **TINY)
    model.load_task_checkpoints(paths)
    with torch.no_grad():
        for unit in model.fusion:
            unit.alpha.copy_(torch.eye(2)[:, :, None].expand_as(unit.alpha))
    model.eval()
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        out = model(x)["final"]
        for t, net in singles.items():
            assert torch.allclose(out[t], net(x)["final"][t], atol=1e-5), t
    with pytest.raises(ValueError, match="not tasks of this model"):
        model.load_task_checkpoints({"edge": paths["depth"]})


def test_fusion_units_start_near_the_own_task():
    tasks = TaskSet("pascal_context", ("semseg", "sal", "edge"))
    stitch = build_model("cross_stitch", tasks=tasks, **TINY)
    alpha = stitch.fusion[0].alpha  # [T, T, C]
    assert torch.allclose(alpha[:, :, 0], torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]]))
    nddr = build_model("nddr", tasks=tasks, **TINY)
    w = nddr.fusion[1].reduce[2][0].weight[:, :, 0, 0]  # task 2 at stage 1: [C, 3C]
    C = w.shape[0]
    for k, scale in enumerate([0.05, 0.05, 0.9]):
        assert torch.allclose(w[:, k * C:(k + 1) * C], scale * torch.eye(C))


def test_per_task_backbones_all_load_the_pretrained_weights(tmp_path):
    plain = build_backbone("resnet_tiny")
    path = tmp_path / "backbone.pth"
    torch.save(plain.state_dict(), path)
    model = build_model("nddr", tasks=NYUD, **TINY)
    model.load_backbone_weights(str(path))
    for branch in model.branches.values():
        assert torch.equal(branch.backbone.layer3[0].conv1.weight, plain.layer3[0].conv1.weight)


def test_mtan_masks_gate_the_shared_features():
    model = build_model("mtan", tasks=NYUD, **TINY).eval()
    x = torch.randn(2, 3, *SIZE)
    feats = model.encoder.backbone.forward_features(x)
    with torch.no_grad():
        mask = model.attention[0]["semseg"](feats[0])
    assert mask.shape == feats[0].shape and (mask > 0).all() and (mask < 1).all()


@pytest.mark.parametrize("arch", ["mtl_baseline", "astmt"])
def test_backbone_lr_scale_multiplies_only_the_backbone_groups(arch):
    cfg = MTLConfig()
    cfg.model.arch, cfg.model.backbone, cfg.optim.backbone_lr_scale = arch, "resnet_tiny", 0.1
    model = build_model(arch, tasks=NYUD, **TINY, astmt_options=cfg.model.astmt)
    plain = {tuple(sorted(id(p) for p in g["params"])): g.get("lr_scale", 1.0)
             for g in build_optimizer(MTLConfig(), model).param_groups}
    groups = build_optimizer(cfg, model).param_groups
    backbone = {id(p) for p in model.encoder.backbone.parameters()}
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    for g in groups:
        inside = {id(p) in backbone for p in g["params"]}
        assert len(inside) == 1  # a group is all backbone or all rest
        base = next(s for k, s in plain.items() if id(g["params"][0]) in k)  # the group it was split from
        assert g["lr_scale"] == pytest.approx(base * (0.1 if inside == {True} else 1.0))
    cfg.optim.backbone_lr_scale = 0.0
    with pytest.raises(ValueError, match="optim.backbone_lr_scale=0.0: must be > 0"):
        build_optimizer(cfg, model)
