"""PAD-Net: initial predictions for every task at 1/4, multi-modal distillation, then final heads (main tasks)."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from torch import nn

from .distillation import MultiModalDistillation
from .encoder import Encoder
from .layers import PredictionConv, conv_bn_relu, residual_stack, resize
from .registry import ARCHITECTURES


class PADNet(nn.Module):
    def __init__(self, encoder: Encoder, *, tasks: Sequence[str], auxiliary: Sequence[str], channels: Mapping[str, int],
                 task_channels: int = 64, head_channels: int = 256) -> None:
        super().__init__()
        self.tasks, self.auxiliary = tuple(tasks), tuple(auxiliary)
        all_tasks = (*self.tasks, *self.auxiliary)
        self.encoder = encoder
        # multi-scale features fused at 1/4 (the resolution PAD-Net distils at)
        self.fuse = conv_bn_relu(sum(encoder.channels), head_channels, 1)
        self.task_features = nn.ModuleDict({t: residual_stack(head_channels, task_channels) for t in all_tasks})
        self.initial_predictions = nn.ModuleDict({t: PredictionConv(task_channels, channels[t]) for t in all_tasks})
        self.distillation = MultiModalDistillation(targets=self.tasks, sources=all_tasks, channels=task_channels)
        self.heads = nn.ModuleDict({t: nn.Sequential(conv_bn_relu(task_channels, task_channels, 3),
                                                     PredictionConv(task_channels, channels[t])) for t in self.tasks})

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
            task_channels: int = 64, head_channels: int = 256, **_: object) -> PADNet:
    """PAD-Net: distillation at one scale (1/4)."""
    return PADNet(encoder, tasks=tasks, auxiliary=auxiliary, channels=channels, task_channels=task_channels,
                  head_channels=head_channels)
