import pytest
import torch
import torchvision

from selfsup.backbones import BACKBONES, build_backbone
from downstream.mtl.necks import FPN

NAMES = BACKBONES.names()


def test_registry_lists_expected_names():
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet_tiny"} <= set(NAMES)


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match="resnet50"):
        build_backbone("resnet5O")


@pytest.mark.parametrize("name", NAMES)
def test_interface_shapes_finite_and_gradients(name):
    torch.manual_seed(0)
    net = build_backbone(name)
    x = torch.randn(2, 3, 64, 64)
    feats = net.forward_features(x)
    assert [f.shape[1] for f in feats] == net.feature_channels
    assert [64 // f.shape[-1] for f in feats] == [4, 8, 16, 32] == net.feature_strides
    pooled = net(x)
    assert pooled.shape == (2, net.num_features) and torch.isfinite(pooled).all()
    (pooled.sum() + sum(f.mean() for f in feats)).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet18", "resnet50"])
@pytest.mark.parametrize("stride", [8, 16])
def test_dilated_dense_map(name, stride):
    net = build_backbone(name, output_stride=stride)
    dense = net.forward_dense(torch.randn(1, 3, 64, 64))
    assert dense.shape[-1] == 64 // stride
    assert net.feature_strides[-1] == stride


def test_dilation_matches_torchvision():
    ours = build_backbone("resnet50", output_stride=8).eval()
    ref = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        expected = torch.flatten(ref.avgpool(ref.layer4(ref.layer3(ref.layer2(ref.layer1(stem))))), 1)
        assert torch.allclose(ours(x), expected, atol=1e-5)


def test_state_dict_is_torchvision_without_fc():
    missing, unexpected = torchvision.models.resnet50().load_state_dict(build_backbone("resnet50").state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_fpn_shapes():
    net = build_backbone("resnet_tiny")
    fpn = FPN(in_channels=net.feature_channels, out_channels=32)
    outs = fpn(net.forward_features(torch.randn(2, 3, 64, 64)))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]


# ---------------------------------------------------------------- HRNetV2-W18

HRNET_CHANNELS = [18, 36, 72, 144]


def _hrnet18_reference_params(stage1_blocks=4, modules=(1, 4, 3), blocks=4) -> int:
    """HRNetV2-W18 parameter count from the architecture description alone (no model is built)."""
    def conv(cin, cout, k):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    def conv_bn(cin, cout, k=3):
        return conv(cin, cout, k) + bn(cout)

    def bottleneck(cin, planes=64, expansion=4):
        out = conv_bn(cin, planes, 1) + conv_bn(planes, planes, 3) + conv_bn(planes, planes * expansion, 1)
        return out + (conv_bn(cin, planes * expansion, 1) if cin != planes * expansion else 0)

    def module(chs):
        total = sum(blocks * 2 * conv_bn(c, c, 3) for c in chs)  # BasicBlocks per branch
        for i, ci in enumerate(chs):
            for j, cj in enumerate(chs):
                if j > i:
                    total += conv_bn(cj, ci, 1)
                elif j < i:
                    total += (i - j - 1) * conv_bn(cj, cj, 3) + conv_bn(cj, ci, 3)
        return total

    c = HRNET_CHANNELS
    stem = conv_bn(3, 64) + conv_bn(64, 64)
    layer1 = bottleneck(64) + (stage1_blocks - 1) * bottleneck(256)
    transitions = conv_bn(256, c[0]) + conv_bn(256, c[1]) + conv_bn(c[1], c[2]) + conv_bn(c[2], c[3])
    stages = modules[0] * module(c[:2]) + modules[1] * module(c[:3]) + modules[2] * module(c)
    return stem + layer1 + transitions + stages


def test_hrnet18_features_pooled_and_gradients():
    assert "hrnet18" in NAMES
    net = build_backbone("hrnet18")
    assert net.feature_channels == HRNET_CHANNELS and net.feature_strides == [4, 8, 16, 32]
    assert net.num_features == sum(HRNET_CHANNELS) == 270 and net.output_stride == 32
    x = torch.randn(2, 3, 64, 64)
    feats = net.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 18, 16, 16), (2, 36, 8, 8), (2, 72, 4, 4), (2, 144, 2, 2)]
    # every parameter (all stages, transitions and fusions) gets a gradient from a loss on the 4 maps
    sum(f.square().mean() for f in feats).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    with torch.no_grad():
        pooled = net(x)
    assert pooled.shape == (2, 270) and torch.isfinite(pooled).all()
    # HRNetV2 concat (branches upsampled to stride 4) averaged: the stride-4 branch comes first and pools exactly
    assert torch.allclose(pooled[:, :18], feats[0].detach().mean(dim=(2, 3)), atol=1e-6)


def test_hrnet18_forward_dense_stages_on_odd_size():
    net = build_backbone("hrnet18").eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        dense = [net.forward_dense(x, stage) for stage in (1, 2, 3, 4)]
    assert [tuple(d.shape) for d in dense] == [(1, 18, 13, 18), (1, 36, 7, 9), (1, 72, 4, 5), (1, 144, 2, 3)]
    assert all(torch.isfinite(d).all() for d in dense)
    with pytest.raises(ValueError, match="stage"):
        net.forward_dense(x, 5)


@pytest.mark.parametrize("stride", [8, 16])
def test_hrnet18_rejects_output_stride(stride):
    with pytest.raises(ValueError, match=f"output_stride.*{stride}"):
        build_backbone("hrnet18", output_stride=stride)


def test_hrnet18_norm_layer_and_zero_init_residual():
    net = build_backbone("hrnet18", zero_init_residual=True, norm_layer=lambda c: torch.nn.GroupNorm(2, c))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert not net.layer1[0].bn3.weight.detach().any()
    assert not net.stage4[0].branches[3][0].bn2.weight.detach().any()
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 270)


def test_hrnet18_parameter_count():
    n = sum(p.numel() for p in build_backbone("hrnet18_full").parameters())
    reference = _hrnet18_reference_params()
    print(f"hrnet18_full parameters: {n} (reference from the architecture description: {reference})")
    assert n == reference
    # paper (Wang et al. 2019): HRNetV2-W18 segmentation 9.6M, including a ~0.08M 1x1 head on the 270 channels
    assert abs(n - 9.6e6) / 9.6e6 < 0.03
    # hrnet18 = HRNetV2-W18-Small-v2, the published multi-task backbone (~3.9M)
    small = sum(p.numel() for p in build_backbone("hrnet18").parameters())
    assert small == _hrnet18_reference_params(stage1_blocks=2, modules=(1, 3, 2), blocks=2)
    assert abs(small - 3.9e6) / 3.9e6 < 0.03, small


def test_hrnet18_checkpoint_round_trip_and_export(tmp_path):
    from selfsup import checkpoint as ckpt
    from selfsup.exporters import export_backbone

    src = build_backbone("hrnet18")
    model = {f"encoder_q.backbone.{k}": v for k, v in src.state_dict().items()}
    model.update({"encoder_q.head.0.weight": torch.zeros(4, 270),
                  **{f"encoder_k.backbone.{k}": v for k, v in src.state_dict().items()}})
    ckpt.save_checkpoint({"epoch": 1, "arch": "hrnet18", "model": model}, tmp_path / "c.pth")

    net = build_backbone("hrnet18")
    assert ckpt.load_backbone_weights(net, tmp_path / "c.pth") == {"missing": [], "unexpected": []}
    assert torch.equal(net.stage4[-1].fuse_layers[3][0][2][0].weight, src.stage4[-1].fuse_layers[3][0][2][0].weight)

    for fmt in ("torchvision", "detectron2"):  # formats consumed as a ResNet
        with pytest.raises(ValueError, match=f"format '{fmt}' needs a ResNet backbone.*moco"):
            export_backbone(tmp_path / "c.pth", fmt=fmt, out=tmp_path / f"x.{fmt}")
        assert not (tmp_path / f"x.{fmt}").exists()
    out = export_backbone(tmp_path / "c.pth", fmt="moco", out=tmp_path / "moco.pth.tar")
    again = build_backbone("hrnet18")
    ckpt.load_backbone_weights(again, out)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), src.state_dict().values()))
    with pytest.raises(ckpt.CheckpointMismatchError, match="missing keys"):
        ckpt.load_backbone_weights(build_backbone("hrnet18"), build_backbone("resnet_tiny").state_dict())
