"""Multi-modal distillation (PAD-Net, MTI-Net): ``F_k^o = F_k + Σ_{l≠k} σ(W_{k,l} F_l) ⊙ (W'_{k,l} F_l)``."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from torch import nn


class SpatialAttentionMessage(nn.Module):
    """Message from task l to task k: a sigmoid gate (3x3 conv) times a 3x3-conv transform of ``F_l``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Conv2d(channels, channels, 3, padding=1)
        self.transform = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x)) * self.transform(x)


class MultiModalDistillation(nn.Module):
    """Distils the features of all ``sources`` (main + auxiliary tasks) into each of ``targets`` (main tasks)."""

    def __init__(self, *, targets: Sequence[str], sources: Sequence[str], channels: int) -> None:
        super().__init__()
        self.targets, self.sources = tuple(targets), tuple(sources)
        self.messages = nn.ModuleDict({
            k: nn.ModuleDict({l: SpatialAttentionMessage(channels) for l in self.sources if l != k}) for k in self.targets})

    def forward(self, feats: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = {}
        for k in self.targets:
            distilled = feats[k]
            for l, message in self.messages[k].items():
                distilled = distilled + message(feats[l])
            out[k] = distilled
        return out
