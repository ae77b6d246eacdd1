"""Per-task prediction heads on the encoder's 4 maps: DeepLab ASPP and the multi-scale head."""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .layers import ASPP, PredictionConv, conv_bn_relu, resize
from .components import HEADS


@HEADS.register("multiscale")
class MultiScaleHead(nn.Module):
    """HRNet-style head: upsample every scale to the finest, concat, 1x1 conv-BN-ReLU, 1x1 classifier."""

    def __init__(self, *, in_channels: Sequence[int], num_outputs: int, channels: int = 256, **_: object) -> None:
        super().__init__()
        self.fuse = conv_bn_relu(sum(in_channels), channels, 1)
        self.classifier = PredictionConv(channels, num_outputs)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        return self.classifier(self.fuse(torch.cat([resize(f, size) for f in feats], dim=1)))


@HEADS.register("aspp")
class DeepLabHead(nn.Module):
    """DeepLab-v3 head on the last (dilated) map: ASPP -> 3x3 conv-BN-ReLU -> 1x1 classifier."""

    def __init__(self, *, in_channels: Sequence[int], num_outputs: int, channels: int = 256,
                 rates: Sequence[int] = (12, 24, 36), **_: object) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels[-1], channels, rates)
        self.refine = conv_bn_relu(channels, channels, 3)
        self.classifier = PredictionConv(channels, num_outputs)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.refine(self.aspp(feats[-1])))


def build_head(name: str, **kwargs) -> nn.Module:
    return HEADS.build(name, **kwargs)
