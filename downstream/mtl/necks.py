"""Feature pyramid network on top of the backbone's 4 multi-scale maps."""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn
from torch.nn import functional as F


class FPN(nn.Module):
    """Lateral 1x1 convs + top-down nearest upsampling + 3x3 output convs.

    Input: maps at strides (4, 8, 16, 32) with ``in_channels``; output: same strides, ``out_channels`` each.
    """

    def __init__(self, *, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.out_channels = out_channels

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse -> fine
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, laterals)]
