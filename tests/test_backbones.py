import pytest
import torch
import torchvision

from selfsup.backbones import BACKBONES, build_backbone
from selfsup.necks import FPN

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
