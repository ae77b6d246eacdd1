"""MTI-Net: multi-scale multi-modal distillation with a feature propagation module between scales.

Scales are indexed 0..3 for strides 4, 8, 16, 32. Per scale s, from the coarsest up:
  1. initial task features: 2 residual blocks on the encoder map (s = 3) or on
     concat(encoder map, upsampled FPM output of scale s+1); a 1x1 conv gives the initial
     (deeply supervised) predictions of every task, auxiliary ones included;
  2. FPM (s > 0) mixes the task features and feeds them to scale s-1;
  3. multi-modal distillation of the initial task features into each main task.
Finally the distilled features of the 4 scales are upsampled to 1/4, concatenated, and a per-task
head predicts the output at the input resolution.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch
from torch import nn

from .distillation import MultiModalDistillation
from .encoder import Encoder
from .layers import PredictionConv, ResidualBlock, SqueezeExcitation, conv_bn_relu, residual_stack, resize
from .components import ARCHITECTURES


FPM_SOFTMAX = ("task", "published")
WIDTHS = ("narrow", "published")
# default width divisor of the FPM's non-linear stack: published = the paper's f (N*C wide; reproduces its
# params/FLOPs table, docs/mtl.md), narrow = N*C/4 (at least C); the released code divides by 4 (fpm_reduction=4)
FPM_REDUCTION = {"published": 1, "narrow": 4}


class FeaturePropagation(nn.Module):
    """FPM: task features -> shared representation (softmax gated) -> per-task SE read-out + residual.

    ``softmax="task"``: over the task axis, as the paper writes it. ``"published"``: as the published code does it,
    the task-major concat [B, N*C, H, W] viewed as [B, C, N, H, W] and softmaxed over dim 2, i.e. over N adjacent
    channels (which mostly belong to one task). ``hidden`` = width of the non-linear stack (default max(C, N*C/4)).
    """

    def __init__(self, *, tasks: Sequence[str], channels: int, se_reduction: int = 16, softmax: str = "task",
                 hidden: int = 0) -> None:
        super().__init__()
        if softmax not in FPM_SOFTMAX:
            raise ValueError(f"model.fpm_softmax={softmax!r}: expected one of {', '.join(FPM_SOFTMAX)}")
        self.tasks, self.softmax = tuple(tasks), softmax
        shared = len(self.tasks) * channels
        hidden = hidden or max(channels, shared // 4)
        self.non_linear = nn.Sequential(ResidualBlock(shared, hidden), ResidualBlock(hidden, hidden),
                                        nn.Conv2d(hidden, shared, 1))
        self.reduce = ResidualBlock(shared, channels)
        self.read_out = nn.ModuleDict({t: SqueezeExcitation(channels, se_reduction) for t in self.tasks})

    def forward(self, feats: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        stacked = torch.stack([feats[t] for t in self.tasks], dim=1)  # [B, N, C, H, W]
        B, N, C, H, W = stacked.shape
        logits = self.non_linear(stacked.reshape(B, N * C, H, W))  # [B, N*C, H, W], task-major
        if self.softmax == "task":
            mask = torch.softmax(logits.reshape(B, N, C, H, W), dim=1)  # over the task axis
        else:  # published code: view(B, C, N, H, W), softmax over dim 2 (N adjacent channels)
            mask = torch.softmax(logits.reshape(B, C, N, H, W), dim=2).reshape(B, N, C, H, W)
        shared = self.reduce((mask * stacked).reshape(B, N * C, H, W))  # [B, C, H, W]
        return {t: feats[t] + self.read_out[t](shared) for t in self.tasks}


class MTINet(nn.Module):
    """``widths="published"``: the task features of scale s have the encoder's channels at s (18/36/72/144 on
    HRNet-18) and the FPM's non-linear stack is N*C/``fpm_reduction`` wide: 1 by default (two residual blocks on
    the N*C concat, as the paper describes f; the model its params/FLOPs table measures), 4 as in the released
    code. ``"narrow"``: ``task_channels`` at every scale and an FPM stack max(C, N*C/``fpm_reduction``) wide,
    ``fpm_reduction`` 4 by default (cheap CPU runs). ``fpm_reduction=0``: the default of ``widths``."""

    def __init__(self, encoder: Encoder, *, tasks: Sequence[str], auxiliary: Sequence[str], channels: Mapping[str, int],
                 task_channels: int = 64, widths: str = "narrow", fpm_softmax: str = "task",
                 fpm_reduction: int = 0) -> None:
        super().__init__()
        if widths not in WIDTHS:
            raise ValueError(f"model.widths={widths!r}: expected one of {', '.join(WIDTHS)}")
        if isinstance(fpm_reduction, bool) or not isinstance(fpm_reduction, int) or fpm_reduction < 0:
            raise ValueError(f"model.fpm_reduction={fpm_reduction!r}: expected an integer >= 1 (0 = the widths' default)")
        self.tasks, self.auxiliary = tuple(tasks), tuple(auxiliary)
        all_tasks = (*self.tasks, *self.auxiliary)
        in_ch = encoder.channels
        C = list(in_ch) if widths == "published" else [task_channels] * 4  # per-scale task channels
        self.encoder = encoder
        # index s = scale (0: 1/4 ... 3: 1/32); the coarsest scale has no FPM input
        self.initial_features = nn.ModuleList(
            nn.ModuleDict({t: residual_stack(in_ch[s] + (C[s + 1] if s < 3 else 0), C[s]) for t in all_tasks})
            for s in range(4))
        self.initial_predictions = nn.ModuleList(
            nn.ModuleDict({t: PredictionConv(C[s], channels[t]) for t in all_tasks}) for s in range(4))
        N = len(all_tasks)
        reduction = fpm_reduction or FPM_REDUCTION[widths]
        hidden = [max(1, N * c // reduction) if widths == "published" else max(c, N * c // reduction) for c in C]
        self.propagation = nn.ModuleList(
            FeaturePropagation(tasks=all_tasks, channels=C[s], softmax=fpm_softmax, hidden=hidden[s]) for s in range(1, 4))
        self.distillation = nn.ModuleList(
            MultiModalDistillation(targets=self.tasks, sources=all_tasks, channels=C[s]) for s in range(4))
        self.heads = nn.ModuleDict({t: nn.Sequential(conv_bn_relu(sum(C), sum(C), 1), PredictionConv(sum(C), channels[t]))
                                    for t in self.tasks})

    def forward(self, x: torch.Tensor) -> Dict[str, object]:
        size = x.shape[-2:]
        feats = self.encoder(x)
        initial: List[Dict[str, torch.Tensor]] = [{} for _ in range(4)]
        distilled: List[Dict[str, torch.Tensor]] = [{} for _ in range(4)]
        propagated = None
        for s in range(3, -1, -1):
            task_feats = {}
            for t, block in self.initial_features[s].items():
                inp = feats[s] if propagated is None else torch.cat([feats[s], resize(propagated[t], feats[s].shape[-2:])], 1)
                task_feats[t] = block(inp)
                initial[s][t] = resize(self.initial_predictions[s][t](task_feats[t]), size)
            if s > 0:
                propagated = self.propagation[s - 1](task_feats)
            distilled[s] = self.distillation[s](task_feats)
        final = {}
        for t in self.tasks:
            fine = distilled[0][t].shape[-2:]
            aggregated = torch.cat([resize(distilled[s][t], fine) for s in range(4)], dim=1)  # [B, 4C, H/4, W/4]
            final[t] = resize(self.heads[t](aggregated), size)
        return {"final": final, "initial": initial}


@ARCHITECTURES.register("mti_net")
def mti_net(*, encoder: Encoder, tasks: Sequence[str], auxiliary: Sequence[str] = (), channels: Mapping[str, int],
            task_channels: int = 64, widths: str = "narrow", fpm_softmax: str = "task", fpm_reduction: int = 0,
            **_: object) -> MTINet:
    """MTI-Net: initial predictions at 4 scales, FPM, per-scale distillation, aggregation."""
    return MTINet(encoder, tasks=tasks, auxiliary=auxiliary, channels=channels, task_channels=task_channels,
                  widths=widths, fpm_softmax=fpm_softmax, fpm_reduction=fpm_reduction)
