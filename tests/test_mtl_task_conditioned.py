"""ASTMT, cross-stitch, NDDR, MTAN: task-specific gradients, the gradient-reversal layer, weight loading."""
import pytest
import torch

from downstream.mtl.bench import synthetic_batch
from downstream.mtl.config import MTLConfig
from downstream.mtl.losses import MultiTaskLoss, task_loss
from downstream.mtl.models import build_model
from downstream.mtl.task_conditioning import grad_reverse, task_specific_parameters
from downstream.mtl.tasks import TaskSet, loss_weights
from downstream.mtl.train import build_optimizer, model_from_config
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


def test_astmt_lr_scales_are_the_published_per_task_steps():
    """Published (astmt main.py/config.py): one SGD step per task pass at shared lr, task-specific lr × T,
    discriminator lr × 10; for the summed loss that is 1 / T / 10 (the old default was 1/T, 1, 10/T)."""
    cfg = MTLConfig()
    cfg.model.arch, cfg.model.backbone = "astmt", "resnet_tiny"
    model = build_model("astmt", tasks=NYUD, **TINY, astmt_options=cfg.model.astmt)
    optimizer = build_optimizer(cfg, model)
    shared, own, discriminator = optimizer.param_groups
    assert (shared["lr_scale"], own["lr_scale"], discriminator["lr_scale"]) == (1.0, 3.0, 10.0)
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert id(model.encoder.backbone.conv1.weight) in {id(p) for p in shared["params"]}
    assert id(model.predict["depth"].weight) in {id(p) for p in own["params"]}
    bn = model.encoder.backbone.layer2[0].bn1.per_task["depth"].weight  # per-task encoder BN is task-specific
    assert id(bn) in {id(p) for p in own["params"]}
    mean = build_model("astmt", tasks=NYUD, **TINY, astmt_options=type(cfg.model.astmt)(lr_scales="mean"))
    assert [g["lr_scale"] for g in mean.param_groups()] == pytest.approx([1 / 3, 1.0, 10 / 3])


def test_astmt_encoder_bn_is_per_task_in_every_block():
    from downstream.mtl.task_conditioning import TaskBatchNorm, TaskConditionedBlock
    model = build_model("astmt", tasks=NYUD, **TINY)
    blocks = [m for m in model.encoder.backbone.modules() if isinstance(m, TaskConditionedBlock)]
    assert blocks
    for block in blocks:  # bn1, bn2 (and bn3) and the shortcut's BN, one per task (published --trNorm True)
        norms = [block.bn1, block.bn2] + ([block.downsample[1]] if block.downsample is not None else [])
        assert all(isinstance(n, TaskBatchNorm) and set(n.per_task) == set(NYUD.all) for n in norms)
    assert not isinstance(model.encoder.backbone.bn1, TaskBatchNorm)  # the stem's BN stays shared, as published
    shared = build_model("astmt", tasks=NYUD, **TINY, astmt_options=MTLConfig().model.astmt.__class__(
        encoder_task_norm=False))
    assert not any(isinstance(m, TaskBatchNorm) for m in shared.encoder.backbone.modules())


def test_astmt_loads_pretrained_backbone_into_shared_layers(tmp_path):
    torch.manual_seed(1)
    plain = build_backbone("resnet_tiny")
    path = tmp_path / "backbone.pth"
    torch.save(plain.state_dict(), path)
    model = build_model("astmt", tasks=NYUD, **TINY)
    model.load_backbone_weights(str(path))
    own = model.encoder.backbone.state_dict()
    for k, v in plain.state_dict().items():  # shared layers as saved; each BN copied into every task's BN
        module, leaf = k.rsplit(".", 1)
        copies = [own[k]] if k in own else [own[f"{module}.per_task.{t}.{leaf}"] for t in NYUD.all]
        assert all(torch.equal(c, v) for c, v in zip(copies, [v] * len(copies))), k
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


def test_fusion_units_start_as_published():
    """MTLP (models/cross_stitch.py, nddr_cnn.py; configs alpha 0.9, beta 0.1): 0.9 on the own task and 0.1 on
    every other task; NDDR's BN momentum 0.05 and 5 fusion points (stem + 4 stages); ``split`` = the old init."""
    from downstream.mtl.config import FusionConfig
    tasks = TaskSet("pascal_context", ("semseg", "sal", "edge"))
    published = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    stitch = build_model("cross_stitch", tasks=tasks, **TINY)
    assert len(stitch.fusion) == 4 and torch.allclose(stitch.fusion[0].alpha[:, :, 0], published)
    split = build_model("cross_stitch", tasks=tasks, **TINY, fusion_options=FusionConfig(init="split"))
    assert torch.allclose(split.fusion[0].alpha[:, :, 0], torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05],
                                                                         [0.05, 0.05, 0.9]]))
    nddr = build_model("nddr", tasks=tasks, **TINY)
    stem = nddr.branches["semseg"].backbone.conv1.out_channels
    assert len(nddr.fusion) == 5 and nddr.fusion[0].reduce[0][0].weight.shape[:2] == (stem, 3 * stem)
    w = nddr.fusion[2].reduce[2][0].weight[:, :, 0, 0]  # task 2 after layer2: [C, 3C]
    C = w.shape[0]
    for k, scale in enumerate([0.1, 0.1, 0.9]):
        assert torch.allclose(w[:, k * C:(k + 1) * C], scale * torch.eye(C))
    assert all(m.momentum == 0.05 for m in nddr.fusion.modules() if isinstance(m, torch.nn.BatchNorm2d))
    old = build_model("nddr", tasks=tasks, **TINY, fusion_options=FusionConfig(nddr_stem=False, nddr_bn_momentum=0.1))
    assert len(old.fusion) == 4 and all(m.momentum == 0.1 for m in old.fusion.modules()
                                        if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(2, 3, *SIZE)
    assert {t: v.shape[1] for t, v in nddr(x)["final"].items()} == tasks.channels()


@pytest.mark.parametrize("arch", ["cross_stitch", "nddr"])
def test_fusion_units_train_at_100x_lr(arch):
    """MTLP utils/common_config.py get_optimizer: the cross-stitch / NDDR parameters at 100 × lr."""
    cfg = MTLConfig()
    cfg.model.arch, cfg.model.backbone = arch, "resnet_tiny"
    model = build_model(arch, tasks=NYUD, **TINY, fusion_options=cfg.model.fusion)
    rest, fusion = build_optimizer(cfg, model).param_groups
    assert (rest["lr_scale"], fusion["lr_scale"]) == (1.0, 100.0)
    assert {id(p) for p in fusion["params"]} == {id(p) for p in model.fusion.parameters()}
    assert len(rest["params"]) + len(fusion["params"]) == len(list(model.parameters()))
    cfg.model.fusion.lr_scale = 1.0
    assert [g["lr_scale"] for g in build_optimizer(cfg, model_from_config(cfg)).param_groups] == [1.0, 1.0]


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


def test_mtan_shared_block_is_a_bottleneck_to_the_stage_width():
    """lorenmt/mtan, MTLP: f_s = Bottleneck(C_{s-1}, planes C_s/4) with C_s outputs; the mask reads 2·C_s."""
    from torchvision.models.resnet import Bottleneck
    from downstream.mtl.config import MTANConfig
    model = build_model("mtan", tasks=NYUD, **TINY)
    ch = model.encoder.backbone.feature_channels
    for s, f in enumerate(model.bridge, start=1):
        assert isinstance(f, Bottleneck) and f.conv1.in_channels == ch[s - 1]
        assert f.conv1.out_channels == ch[s] // 4 and f.conv3.out_channels == ch[s]
        assert model.attention[s]["depth"][0].in_channels == 2 * ch[s]
    out = model(torch.randn(2, 3, *SIZE))["final"]
    assert out["depth"].shape == (2, 1, *SIZE)
    narrow = build_model("mtan", tasks=NYUD, **TINY, mtan_options=MTANConfig(shared_block="conv"))
    assert [f[0].out_channels for f in narrow.bridge] == [c // 4 for c in ch[1:]]
    assert narrow.attention[1]["depth"][0].in_channels == ch[1] + ch[1] // 4


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
