"""Shared encoder: a backbone from ``selfsup.backbones`` plus an optional FPN neck.

Output: 4 maps at strides ``encoder.strides`` with ``encoder.channels`` (FPN: equal channels).
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from selfsup.backbones import build_backbone
from downstream.mtl.necks import FPN


class Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, neck: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.strides: List[int] = list(backbone.feature_strides)
        self.channels: List[int] = ([neck.out_channels] * 4 if neck is not None else list(backbone.feature_channels))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.backbone.forward_features(x)
        return self.neck(feats) if self.neck is not None else feats


def build_encoder(*, backbone: str = "resnet18", output_stride: int = 32, neck: str = "fpn",
                  fpn_channels: int = 256) -> Encoder:
    """Backbone ``backbone`` (random init; load weights afterwards) + ``neck`` ('fpn' or 'none')."""
    net = build_backbone(backbone, output_stride=output_stride)
    if neck == "fpn":
        return Encoder(net, FPN(in_channels=net.feature_channels, out_channels=fpn_channels))
    if neck == "none":
        return Encoder(net)
    raise ValueError(f"unknown neck {neck!r}; known: fpn, none")
