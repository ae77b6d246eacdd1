"""PAD-Net: initial predictions for every task at 1/4, multi-modal distillation, then final heads (main tasks).

``widths="published"`` (the published code): the encoder maps upsampled to 1/4 and concatenated feed, per task,
2 Bottlenecks (64 planes, ``head_channels`` = 256 out) -> initial prediction; distillation at 256 channels; final
heads of 2 Bottlenecks + 1x1. ``"narrow"``: a 1x1 fusion to ``head_channels``, 2 residual blocks of
``task_channels``, distillation at ``task_channels``, a 3x3 conv head (cheap CPU runs).
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from .distillation import MultiModalDistillation
from .encoder import Encoder
from .layers import PredictionConv, conv_bn_relu, residual_stack, resize
from .components import ARCHITECTURES


def bottleneck_stack(in_channels: int, out_channels: int, depth: int = 2) -> nn.Sequential:
    """``depth`` ResNet Bottlenecks (planes = out/4); the first projects its shortcut when the width changes."""
    down = (None if in_channels == out_channels else
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)))
    return nn.Sequential(Bottleneck(in_channels, out_channels // 4, downsample=down),
                         *[Bottleneck(out_channels, out_channels // 4) for _ in range(depth - 1)])


class PADNet(nn.Module):
    def __init__(self, encoder: Encoder, *, tasks: Sequence[str], auxiliary: Sequence[str], channels: Mapping[str, int],
                 task_channels: int = 64, head_channels: int = 256, widths: str = "narrow") -> None:
        super().__init__()
        if widths not in ("narrow", "published"):
            raise ValueError(f"model.widths={widths!r}: expected narrow or published")
        self.tasks, self.auxiliary = tuple(tasks), tuple(auxiliary)
        all_tasks = (*self.tasks, *self.auxiliary)
        self.encoder = encoder
        if widths == "published":
            C = head_channels
            self.fuse = nn.Identity()  # the concatenated multi-scale map goes straight into the task blocks
            self.task_features = nn.ModuleDict({t: bottleneck_stack(sum(encoder.channels), C) for t in all_tasks})
            head = lambda t: nn.Sequential(bottleneck_stack(C, C), PredictionConv(C, channels[t]))  # noqa: E731
        else:
            C = task_channels
            # multi-scale features fused at 1/4 (the resolution PAD-Net distils at)
            self.fuse = conv_bn_relu(sum(encoder.channels), head_channels, 1)
            self.task_features = nn.ModuleDict({t: residual_stack(head_channels, C) for t in all_tasks})
            head = lambda t: nn.Sequential(conv_bn_relu(C, C, 3), PredictionConv(C, channels[t]))  # noqa: E731
        self.initial_predictions = nn.ModuleDict({t: PredictionConv(C, channels[t]) for t in all_tasks})
        self.distillation = MultiModalDistillation(targets=self.tasks, sources=all_tasks, channels=C)
        self.heads = nn.ModuleDict({t: head(t) for t in self.tasks})

    def forward(self, x: torch.Tensor) -> Dict[str, object]:
        size = x.shape[-2:]
        feats = self.encoder(x)
        fused = self.fuse(torch.cat([resize(f, feats[0].shape[-2:]) for f in feats], dim=1))  # [B, C, H/4, W/4]
        task_feats = {t: block(fused) for t, block in self.task_features.items()}
        initial = {t: resize(self.initial_predictions[t](f), size) for t, f in task_feats.items()}
        distilled = self.distillation(task_feats)
        final = {t: resize(self.heads[t](distilled[t]), size) for t in self.tasks}
        return {"final": final, "initial": [initial]}


@ARCHITECTURES.register("pad_net")
def pad_net(*, encoder: Encoder, tasks: Sequence[str], auxiliary: Sequence[str] = (), channels: Mapping[str, int],
            task_channels: int = 64, head_channels: int = 256, widths: str = "narrow", **_: object) -> PADNet:
    """PAD-Net: distillation at one scale (1/4)."""
    return PADNet(encoder, tasks=tasks, auxiliary=auxiliary, channels=channels, task_channels=task_channels,
                  head_channels=head_channels, widths=widths)
