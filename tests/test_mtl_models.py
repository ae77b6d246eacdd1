"""Every architecture x task set: outputs at input resolution, finite, every parameter gets a gradient."""
import pytest
import torch

from selfsup.backbones import BACKBONES

from downstream.mtl.bench import synthetic_batch
from downstream.mtl.encoder import build_encoder
from downstream.mtl.losses import MultiTaskLoss
from downstream.mtl.models import architecture_names, build_model, init_output_bias
from downstream.mtl.tasks import TaskSet, loss_weights

TINY = dict(backbone="resnet_tiny", fpn_channels=16, head_channels=16, task_channels=8)
TASK_SETS = {
    "nyud": TaskSet("nyud", ("semseg", "depth")),
    "nyud_aux": TaskSet("nyud", ("semseg", "depth"), ("normals", "edge")),
    "pascal": TaskSet("pascal_context", ("semseg", "human_parts", "sal", "normals", "edge")),
}


def _targets(tasks: TaskSet, B: int, H: int, W: int):
    return synthetic_batch(tasks, B, (H, W), torch.device("cpu"))[1]


def _check(model, tasks: TaskSet, H=64, W=64):
    torch.manual_seed(0)
    x = torch.randn(2, 3, H, W)
    out = model(x)
    assert set(out["final"]) == set(tasks.main)
    for group in [out["final"], *out["initial"]]:
        for t, pred in group.items():
            assert pred.shape == (2, tasks.num_outputs(t), H, W), (t, pred.shape)
            assert torch.isfinite(pred).all()
    total, terms = MultiTaskLoss(loss_weights(tasks.dataset, tasks.all))(out, _targets(tasks, 2, H, W))
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without (finite) gradient: {missing[:10]}"
    return out


def test_registry_lists_architectures():
    assert {"single_task", "mtl_baseline", "pad_net", "mti_net", "astmt", "cross_stitch", "nddr", "mtan"} <= set(
        architecture_names())
    with pytest.raises(KeyError, match="known"):
        build_model("no_such_net", tasks=TASK_SETS["nyud"], **TINY)


@pytest.mark.parametrize("arch", ["mtl_baseline", "pad_net", "mti_net"])
@pytest.mark.parametrize("task_set", list(TASK_SETS))
def test_multi_task_architectures(arch, task_set):
    tasks = TASK_SETS[task_set]
    out = _check(build_model(arch, tasks=tasks, **TINY), tasks)
    if arch == "mti_net":  # deep supervision at 4 scales, auxiliary tasks included
        assert len(out["initial"]) == 4 and all(set(s) == set(tasks.all) for s in out["initial"])
    if arch == "pad_net":
        assert len(out["initial"]) == 1 and set(out["initial"][0]) == set(tasks.all)


# What an architecture needs beyond the default case (nyud semseg + depth main, normals + edge auxiliary, 32 px):
# a registered architecture without an entry here is tested on the default case, so registering it tests it.
ARCH_CASES = {
    "single_task": dict(tasks=TaskSet("nyud", ("depth",))),
    "branched": dict(options=dict(branching=[[["semseg", "depth", "normals", "edge"]], [["semseg", "depth"], ["normals", "edge"]],
                                             [["semseg"], ["depth"], ["normals", "edge"]], [["semseg"], ["depth"], ["normals"], ["edge"]]])),
}
# the encoder-focused and single-tasking architectures: auxiliary tasks supervise one initial prediction
INITIAL_IS_AUXILIARY = {"astmt", "cross_stitch", "nddr", "mtan"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch", architecture_names())
def test_every_registered_architecture_builds_runs_and_backpropagates(arch):
    """Every entry of the ARCHITECTURES registry on a tiny input: outputs of every task at input size, finite,
    every parameter gets a finite gradient (32 px keeps the per-task backbones / passes cheap)."""
    case = ARCH_CASES.get(arch, {})
    tasks = case.get("tasks", TASK_SETS["nyud_aux"])
    out = _check(build_model(arch, tasks=tasks, **TINY, **case.get("options", {})), tasks, H=32, W=32)
    assert all(set(group) <= set(tasks.all) for group in out["initial"])
    if arch in INITIAL_IS_AUXILIARY:
        assert len(out["initial"]) == 1 and set(out["initial"][0]) == set(tasks.auxiliary)


@pytest.mark.parametrize("task", ["semseg", "human_parts", "sal", "normals", "edge"])
def test_single_task(task):
    tasks = TaskSet("pascal_context", (task,))
    out = _check(build_model("single_task", tasks=tasks, **TINY), tasks)
    assert out["initial"] == []


def test_single_task_rejects_several_tasks():
    with pytest.raises(ValueError, match="exactly one task"):
        build_model("single_task", tasks=TASK_SETS["nyud"], **TINY)


def test_deeplab_baseline_on_dilated_backbone():
    tasks = TASK_SETS["nyud_aux"]
    model = build_model("mtl_baseline", tasks=tasks, backbone="resnet_tiny", output_stride=8, neck="none",
                        head="aspp", head_channels=16, aspp_rates=(2, 4, 6))
    _check(model, tasks, H=48, W=80)


def test_odd_input_size_mti_net():
    tasks = TASK_SETS["nyud_aux"]
    _check(build_model("mti_net", tasks=tasks, **TINY), tasks, H=50, W=70)


@pytest.mark.parametrize("arch,neck", [("mti_net", "none"), ("mtl_baseline", "fpn")])
def test_hrnet18_backbone(arch, neck):
    """HRNetV2-W18 encoder: MTI-Net directly on the 4 branches (as in the paper), the baseline on an FPN."""
    tasks = TASK_SETS["nyud"]
    model = build_model(arch, tasks=tasks, backbone="hrnet18", neck=neck, fpn_channels=16, head_channels=16,
                        task_channels=8)
    assert model.encoder.channels == ([18, 36, 72, 144] if neck == "none" else [16] * 4)
    _check(model, tasks)


@pytest.mark.parametrize("arch", ["single_task", "mtl_baseline", "pad_net", "mti_net"])
def test_depth_output_starts_at_the_prior(arch):
    """init_output_bias sets every depth prediction layer (initial and final) and no other task's."""
    tasks = TaskSet("nyud", ("depth",)) if arch == "single_task" else TASK_SETS["nyud_aux"]
    model = build_model(arch, tasks=tasks, **TINY)
    expected_layers = {"single_task": 1, "mtl_baseline": 1, "pad_net": 2, "mti_net": 5}[arch]
    assert init_output_bias(model, "depth", 5.0) == expected_layers
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    groups = [out["final"], *out["initial"]]
    assert sum("depth" in g for g in groups) == expected_layers
    for group in groups:
        if "depth" in group:
            assert abs(group["depth"].mean().item() - 5.0) < 1.0
        for t in set(group) - {"depth"}:
            assert abs(group[t].mean().item()) < 1.0  # other tasks keep PyTorch's init
    with pytest.raises(ValueError, match="no prediction layer for task 'human_parts'"):
        init_output_bias(model, "human_parts", 1.0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_every_registered_backbone_carries_the_mtl_encoder(backbone):
    """Every entry of the BACKBONES registry under the shared MTL encoder: the FPN is built on the channels the
    backbone declares (``feature_channels``) and gives 4 maps at the declared strides (tests/test_backbones.py
    checks the declared channels against the feature maps and the gradients of every registered backbone)."""
    encoder = build_encoder(backbone=backbone, fpn_channels=8).eval()
    with torch.no_grad():
        maps = encoder(torch.randn(1, 3, 64, 64))
    assert encoder.channels == [8] * 4
    assert [tuple(m.shape) for m in maps] == [(1, 8, 64 // s, 64 // s) for s in encoder.backbone.feature_strides]
