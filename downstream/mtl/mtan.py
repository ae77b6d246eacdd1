"""MTAN: Multi-Task Attention Network (Liu et al., CVPR 2019) on a shared ResNet encoder.

Per stage s with shared output p_s and per task t:
  mask_t^s = σ(BN(1x1(ReLU(BN(1x1(input))))))    input = p_0 at s = 0, else [p_s ; f_s(a_t^{s-1})]
           (hidden width C_s / 4, as lorenmt/mtan's ResNet variant and MTLP; the SegNet one uses C_s)
  a_t^s    = mask_t^s ⊙ p_s
where f_s, shared by the tasks, is by default (``shared_block="bottleneck"``) a Bottleneck with C_s / 4 planes and
C_s output channels (1x1 projection shortcut) on a_t^{s-1}, as MTLP's refinement block and lorenmt/mtan's
ResNet variant, then max-pooled to p_s's size; ``shared_block="conv"`` is a narrower, cheaper f_s: one 3x3
conv-BN-ReLU to C_s / 4 channels. The task features a_t^0..3 go through the (shared) neck and the task's head.
The paper feeds the mask with the block's intermediate features u_s and gates its output p_s; our backbone
interface exposes stage outputs only, so u_s = p_s here.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet as tv_resnet

from .encoder import Encoder
from .heads import build_head
from .layers import conv_bn_relu, resize
from .components import ARCHITECTURES
from .task_conditioning import TaskModules, check_resnet, resnet_stage


def attention_mask(in_channels: int, channels: int, reduction: int = 4) -> nn.Sequential:
    hidden = max(1, channels // reduction)
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.Sigmoid())


SHARED_BLOCKS = ("bottleneck", "conv")


def make_shared_block(in_channels: int, channels: int, kind: str = "bottleneck") -> nn.Module:
    """f_s: ``in_channels`` (C_{s-1}) -> ``bottleneck``: C_s (C_s / 4 planes), ``conv``: C_s / 4."""
    if kind == "bottleneck":
        planes = max(1, channels // 4)
        shortcut = nn.Sequential(nn.Conv2d(in_channels, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4))
        return tv_resnet.Bottleneck(in_channels, planes, downsample=shortcut)
    if kind == "conv":
        return conv_bn_relu(in_channels, channels // 4, 3)
    raise ValueError(f"model.mtan.shared_block={kind!r}: expected one of {', '.join(SHARED_BLOCKS)}")


class MTAN(nn.Module):
    def __init__(self, encoder: Encoder, *, tasks: Sequence[str], auxiliary: Sequence[str], channels: Mapping[str, int],
                 head: str = "multiscale", head_channels: int = 256, aspp_rates: Sequence[int] = (12, 24, 36),
                 shared_block: str = "bottleneck") -> None:
        super().__init__()
        if shared_block not in SHARED_BLOCKS:
            raise ValueError(f"model.mtan.shared_block={shared_block!r}: expected one of {', '.join(SHARED_BLOCKS)}")
        check_resnet(encoder.backbone, "mtan")
        self.tasks, self.auxiliary = tuple(tasks), tuple(auxiliary)
        self.all_tasks = (*self.tasks, *self.auxiliary)
        self.encoder = encoder
        ch = encoder.backbone.feature_channels
        bridged = [0] + [ch[s] if shared_block == "bottleneck" else ch[s] // 4 for s in range(1, 4)]  # f_s outputs
        self.attention = nn.ModuleList(
            TaskModules({t: attention_mask(ch[s] + bridged[s], ch[s]) for t in self.all_tasks}) for s in range(4))
        self.bridge = nn.ModuleList(make_shared_block(ch[s - 1], ch[s], shared_block) for s in range(1, 4))  # shared
        self.heads = nn.ModuleDict({t: build_head(head, in_channels=encoder.channels, num_outputs=channels[t],
                                                  channels=head_channels, rates=aspp_rates) for t in self.all_tasks})

    def forward(self, x: torch.Tensor) -> Dict[str, object]:
        attended: Dict[str, List[torch.Tensor]] = {t: [] for t in self.all_tasks}
        shared = x
        for s in range(4):
            shared = resnet_stage(self.encoder.backbone, s, shared)  # p_s
            for t in self.all_tasks:
                if s == 0:
                    inp = shared
                else:
                    prev = self.bridge[s - 1](attended[t][-1])
                    if prev.shape[-2:] != shared.shape[-2:]:
                        prev = F.adaptive_max_pool2d(prev, shared.shape[-2:])
                    inp = torch.cat([shared, prev], dim=1)
                attended[t].append(self.attention[s][t](inp) * shared)
        neck = self.encoder.neck
        preds = {t: resize(self.heads[t](neck(f) if neck is not None else f), x.shape[-2:]) for t, f in attended.items()}
        auxiliary = {t: preds[t] for t in self.auxiliary}
        return {"final": {t: preds[t] for t in self.tasks}, "initial": [auxiliary] if auxiliary else []}


@ARCHITECTURES.register("mtan")
def mtan(*, encoder: Encoder, tasks: Sequence[str], auxiliary: Sequence[str] = (), channels: Mapping[str, int],
         head: str = "multiscale", head_channels: int = 256, aspp_rates: Sequence[int] = (12, 24, 36),
         mtan_options=None, **_: object) -> MTAN:
    """Shared ResNet encoder, per-task attention masks after every stage, one head per task."""
    kw = {} if mtan_options is None else dict(shared_block=mtan_options.shared_block)
    return MTAN(encoder, tasks=tasks, auxiliary=auxiliary, channels=channels, head=head, head_channels=head_channels,
                aspp_rates=aspp_rates, **kw)
