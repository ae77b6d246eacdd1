"""Single-task networks and the MTL baseline: one shared encoder, one head per task."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from torch import nn

from .encoder import Encoder
from .heads import build_head
from .layers import resize
from .components import ARCHITECTURES


class MultiTaskBaseline(nn.Module):
    """Shared encoder + independent heads. Auxiliary tasks get heads too (supervised, not evaluated)."""

    def __init__(self, encoder: Encoder, *, tasks: Sequence[str], auxiliary: Sequence[str], channels: Mapping[str, int],
                 head: str = "multiscale", head_channels: int = 256, aspp_rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__()
        self.tasks, self.auxiliary = tuple(tasks), tuple(auxiliary)
        self.encoder = encoder
        self.heads = nn.ModuleDict({t: build_head(head, in_channels=encoder.channels, num_outputs=channels[t],
                                                  channels=head_channels, rates=aspp_rates)
                                    for t in (*self.tasks, *self.auxiliary)})

    def forward(self, x: torch.Tensor) -> Dict[str, object]:
        feats = self.encoder(x)
        size = x.shape[-2:]
        final = {t: resize(self.heads[t](feats), size) for t in self.tasks}
        auxiliary = {t: resize(self.heads[t](feats), size) for t in self.auxiliary}
        return {"final": final, "initial": [auxiliary] if auxiliary else []}


@ARCHITECTURES.register("mtl_baseline")
def mtl_baseline(*, encoder: Encoder, tasks: Sequence[str], auxiliary: Sequence[str] = (), channels: Mapping[str, int],
                 head: str = "multiscale", head_channels: int = 256, aspp_rates: Sequence[int] = (12, 24, 36),
                 **_: object) -> MultiTaskBaseline:
    """Shared encoder, one head per task."""
    return MultiTaskBaseline(encoder, tasks=tasks, auxiliary=auxiliary, channels=channels, head=head,
                             head_channels=head_channels, aspp_rates=aspp_rates)


@ARCHITECTURES.register("single_task")
def single_task(*, encoder: Encoder, tasks: Sequence[str], auxiliary: Sequence[str] = (), channels: Mapping[str, int],
                head: str = "multiscale", head_channels: int = 256, aspp_rates: Sequence[int] = (12, 24, 36),
                **_: object) -> MultiTaskBaseline:
    """One encoder and one head for exactly one task."""
    if len(tasks) != 1 or auxiliary:
        raise ValueError(f"single_task needs exactly one task and no auxiliary tasks, got {list(tasks)} + {list(auxiliary)}")
    return MultiTaskBaseline(encoder, tasks=tasks, auxiliary=(), channels=channels, head=head,
                             head_channels=head_channels, aspp_rates=aspp_rates)
