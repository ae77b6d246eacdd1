"""Backbones shared by pretraining, dense multi-task heads, probes, propagation and retrieval.

Every backbone exposes one interface:

* ``forward(x)``           -> pooled features ``[B, num_features]``
* ``forward_features(x)``  -> 4 maps at strides (4, 8, 16, 32) (less where dilated)
* ``forward_dense(x, stage=4)`` -> one map, the output of ``layer{stage}``

``output_stride`` (32, 16 or 8) replaces the stride of the last stages with dilation,
as DeepLab heads and dense evaluations (DAVIS propagation at stride 8) need.
The state_dict keys equal torchvision's ResNet keys without ``fc.*``, so an exported
backbone loads straight into ``torchvision.models.resnet50()``.

``hrnet18`` (HRNetV2-W18-Small-v2; ``hrnet18_full`` = HRNetV2-W18, :mod:`selfsup.hrnet`) has the same interface with channels (18, 36, 72, 144),
``num_features`` 270 (the 4 branches upsampled to stride 4 and concatenated, then pooled) and only
``output_stride=32``; ``forward_dense(x, stage)`` returns its branch ``stage - 1``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from selfsup.hrnet import SMALL_V2, HRNetBackbone
from selfsup.registry import Registry

BACKBONES = Registry("backbone")

# which of (layer2, layer3, layer4) trade their stride for dilation
_DILATION_FOR_STRIDE = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc``, with the shared feature interface."""

    def __init__(self, net: tv_resnet.ResNet, *, output_stride: int = 32) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.output_stride = output_stride
        self.feature_channels: List[int] = [_out_channels(getattr(self, f"layer{i}")) for i in range(1, 5)]
        self.feature_strides: List[int] = [4, 8, min(16, output_stride), output_stride]
        self.num_features = self.feature_channels[-1]

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats  # strides self.feature_strides

    def forward_dense(self, x: torch.Tensor, stage: int = 4) -> torch.Tensor:
        """Output of ``layer{stage}`` (stages after it are not computed)."""
        if stage not in (1, 2, 3, 4):
            raise ValueError(f"stage must be 1..4, got {stage}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, stage + 1):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.forward_dense(x, 4), 1), 1)


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def _check_stride(output_stride: int) -> List[bool]:
    if output_stride not in _DILATION_FOR_STRIDE:
        raise ValueError(f"output_stride must be one of {sorted(_DILATION_FOR_STRIDE)}, got {output_stride}")
    return _DILATION_FOR_STRIDE[output_stride]


def _dilate(net: tv_resnet.ResNet, output_stride: int) -> tv_resnet.ResNet:
    """Trade the stride of layer3/layer4 for dilation (works for Basic and Bottleneck blocks).

    As torchvision's ``replace_stride_with_dilation``: the first block of a dilated stage keeps the
    previous dilation, the following blocks use the new one.
    """
    dilation = 1
    for layer, dilate in zip((net.layer2, net.layer3, net.layer4), _check_stride(output_stride)):
        if not dilate:
            continue
        previous, dilation = dilation, dilation * 2
        for i, block in enumerate(layer):
            for conv in block.modules():
                if isinstance(conv, nn.Conv2d) and conv.stride == (2, 2):
                    conv.stride = (1, 1)
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                    d = previous if i == 0 else dilation
                    conv.dilation, conv.padding = (d, d), (d, d)
    return net


def _torchvision_resnet(fn: Callable[..., tv_resnet.ResNet], output_stride: int, zero_init_residual: bool,
                        norm_layer: Optional[Callable[..., nn.Module]]) -> ResNetBackbone:
    net = fn(weights=None, zero_init_residual=zero_init_residual, norm_layer=norm_layer)
    return ResNetBackbone(_dilate(net, output_stride), output_stride=output_stride)


def _register_torchvision(name: str, fn: Callable[..., tv_resnet.ResNet]) -> None:
    @BACKBONES.register(name)
    def build(*, output_stride: int = 32, zero_init_residual: bool = False,
              norm_layer: Optional[Callable[..., nn.Module]] = None) -> ResNetBackbone:
        return _torchvision_resnet(fn, output_stride, zero_init_residual, norm_layer)

    build.__doc__ = f"torchvision {name} (random init; weights are never downloaded)."


for _name in ("resnet18", "resnet34", "resnet50", "resnet101"):
    _register_torchvision(_name, getattr(tv_resnet, _name))


@BACKBONES.register("resnet_tiny")
def resnet_tiny(*, output_stride: int = 32, zero_init_residual: bool = False,
                norm_layer: Optional[Callable[..., nn.Module]] = None,
                widths: Sequence[int] = (16, 32, 64, 128), layers: Sequence[int] = (1, 1, 1, 1)) -> ResNetBackbone:
    """A narrow BasicBlock ResNet for tests and CPU demos (same module names as torchvision)."""
    block = tv_resnet.BasicBlock
    net = tv_resnet.ResNet(block, [1, 1, 1, 1], zero_init_residual=zero_init_residual, norm_layer=norm_layer)
    norm = net._norm_layer
    net.inplanes, net.dilation = widths[0], 1
    net.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = norm(widths[0])
    net.layer1 = net._make_layer(block, widths[0], layers[0])
    net.layer2 = net._make_layer(block, widths[1], layers[1], stride=2)
    net.layer3 = net._make_layer(block, widths[2], layers[2], stride=2)
    net.layer4 = net._make_layer(block, widths[3], layers[3], stride=2)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return ResNetBackbone(_dilate(net, output_stride), output_stride=output_stride)


@BACKBONES.register("resnet_small")
def resnet_small(*, output_stride: int = 32, zero_init_residual: bool = False,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> ResNetBackbone:
    """Half-width, one block per stage (~1/8 of ResNet-18's FLOPs): the CPU demo backbone."""
    return resnet_tiny(output_stride=output_stride, zero_init_residual=zero_init_residual, norm_layer=norm_layer,
                       widths=(32, 64, 128, 256))


@BACKBONES.register("hrnet18")
def hrnet18(*, output_stride: int = 32, zero_init_residual: bool = False,
            norm_layer: Optional[Callable[..., nn.Module]] = None) -> HRNetBackbone:
    """HRNetV2-W18-Small-v2 (~3.9M params), the multi-task HRNet-18 of the published MTI-Net code (random init;
    weights are never downloaded). Only ``output_stride=32``."""
    return HRNetBackbone(width=18, output_stride=output_stride, zero_init_residual=zero_init_residual,
                         norm_layer=norm_layer, **SMALL_V2)


@BACKBONES.register("hrnet18_full")
def hrnet18_full(*, output_stride: int = 32, zero_init_residual: bool = False,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> HRNetBackbone:
    """The full HRNetV2-W18 (~9.6M params; random init). Only ``output_stride=32``."""
    return HRNetBackbone(width=18, output_stride=output_stride, zero_init_residual=zero_init_residual,
                         norm_layer=norm_layer)


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone by name, e.g. ``build_backbone("resnet50", output_stride=8)``."""
    return BACKBONES.build(name, **kwargs)
