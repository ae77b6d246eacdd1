"""Encoder-focused multi-task networks with one backbone per task, fused after every stage.

* ``cross_stitch`` (Misra et al., CVPR 2016): after stage s, task t continues with
  ``x̃_t = Σ_k α^s_{t,k} ⊙ x_k`` (α per channel, initialised α_{t,t} = 0.9 and 0.1 split over the others).
* ``nddr`` (Gao et al., CVPR 2019, NDDR-CNN): after stage s, task t continues with
  ``ReLU(BN(W_t [x_1; ...; x_T]))`` (1x1 conv over the concatenated task features, initialised to
  0.9 × identity on the own task's channels and 0.1 × identity split over the others).

Every task (auxiliary ones included) has a copy of the encoder (backbone + neck) and its own head. Main tasks'
outputs are ``final``, auxiliary ones ``initial`` (as in the MTL baseline). ``load_backbone_weights`` puts the
pretrained backbone into every copy; ``load_task_checkpoints`` starts each branch (encoder + head) from that
task's single-task run.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Mapping, Sequence

import torch
from torch import nn

from selfsup.checkpoint import load_backbone_weights, load_checkpoint

from .encoder import Encoder
from .heads import build_head
from .layers import resize
from .registry import ARCHITECTURES
from .task_conditioning import check_resnet, resnet_stage


def own_task_init(num_tasks: int, own: float = 0.9) -> torch.Tensor:
    """[T, T] mixing weights: ``own`` on the diagonal, ``1 - own`` split over the other tasks."""
    if num_tasks == 1:
        return torch.ones(1, 1)
    w = torch.full((num_tasks, num_tasks), (1.0 - own) / (num_tasks - 1))
    return w.fill_diagonal_(own)


class CrossStitchUnit(nn.Module):
    """α [T, T, C]: output t = Σ_k α[t, k] ⊙ input k (per channel)."""

    def __init__(self, num_tasks: int, channels: int, own: float = 0.9) -> None:
        super().__init__()
        self.alpha = nn.Parameter(own_task_init(num_tasks, own)[:, :, None].repeat(1, 1, channels))

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        stacked = torch.stack(feats, dim=1)  # [B, T, C, H, W]
        mixed = torch.einsum("tkc,bkchw->btchw", self.alpha, stacked)
        return list(mixed.unbind(dim=1))


class NDDRUnit(nn.Module):
    """Per task: concat the T task features -> 1x1 conv (T·C -> C) -> BN -> ReLU."""

    def __init__(self, num_tasks: int, channels: int, own: float = 0.9) -> None:
        super().__init__()
        init = own_task_init(num_tasks, own)
        eye = torch.eye(channels)
        self.reduce = nn.ModuleList()
        for t in range(num_tasks):
            conv = nn.Conv2d(num_tasks * channels, channels, 1, bias=False)
            with torch.no_grad():  # weight [C, T·C, 1, 1]: block k = init[t, k] · I
                conv.weight.copy_(torch.cat([init[t, k] * eye for k in range(num_tasks)], dim=1)[:, :, None, None])
            self.reduce.append(nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True)))

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        cat = torch.cat(feats, dim=1)
        return [reduce(cat) for reduce in self.reduce]


class StageFusionNet(nn.Module):
    """One encoder copy per task; ``fusion[s]`` mixes the task features after stage s (s = 0..3)."""

    def __init__(self, encoder: Encoder, *, tasks: Sequence[str], auxiliary: Sequence[str], channels: Mapping[str, int],
                 unit: type, head: str = "multiscale", head_channels: int = 256,
                 aspp_rates: Sequence[int] = (12, 24, 36), own: float = 0.9) -> None:
        super().__init__()
        check_resnet(encoder.backbone, "cross_stitch / nddr")
        self.tasks, self.auxiliary = tuple(tasks), tuple(auxiliary)
        self.all_tasks = (*self.tasks, *self.auxiliary)
        self.branches = nn.ModuleDict({t: copy.deepcopy(encoder) for t in self.all_tasks})
        T = len(self.all_tasks)
        self.fusion = nn.ModuleList(unit(T, c, own) for c in encoder.backbone.feature_channels)
        self.heads = nn.ModuleDict({t: build_head(head, in_channels=encoder.channels, num_outputs=channels[t],
                                                  channels=head_channels, rates=aspp_rates) for t in self.all_tasks})

    def forward(self, x: torch.Tensor) -> Dict[str, object]:
        nets = [self.branches[t] for t in self.all_tasks]
        per_task: List[List[torch.Tensor]] = [[] for _ in nets]  # [task][stage]
        xs = [x] * len(nets)
        for s, fuse in enumerate(self.fusion):
            xs = fuse([resnet_stage(net.backbone, s, xi) for net, xi in zip(nets, xs)])
            for i, xi in enumerate(xs):
                per_task[i].append(xi)
        preds = {}
        for t, net, feats in zip(self.all_tasks, nets, per_task):
            feats = net.neck(feats) if net.neck is not None else feats
            preds[t] = resize(self.heads[t](feats), x.shape[-2:])
        auxiliary = {t: preds[t] for t in self.auxiliary}
        return {"final": {t: preds[t] for t in self.tasks}, "initial": [auxiliary] if auxiliary else []}

    def load_backbone_weights(self, source) -> None:
        """The pretrained backbone into every task's copy."""
        for branch in self.branches.values():
            load_backbone_weights(branch.backbone, source)

    def load_task_checkpoints(self, paths: Mapping[str, str]) -> None:
        """Encoder + head of each listed task from its single-task run (``checkpoint.pth`` of arch single_task)."""
        unknown = sorted(set(paths) - set(self.all_tasks))
        if unknown:
            raise ValueError(f"model.task_checkpoints names {unknown}, which are not tasks of this model "
                             f"{list(self.all_tasks)}")
        for task, path in paths.items():
            state = load_checkpoint(path)
            model = state.get("model", state)
            if state.get("arch", "single_task") != "single_task":
                raise ValueError(f"model.task_checkpoints[{task}]={path}: expected a single_task checkpoint, "
                                 f"got arch {state['arch']!r}")
            encoder = {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}
            head = {k[len(f"heads.{task}."):]: v for k, v in model.items() if k.startswith(f"heads.{task}.")}
            if not encoder or not head:
                raise ValueError(f"model.task_checkpoints[{task}]={path}: no encoder.* / heads.{task}.* weights")
            self.branches[task].load_state_dict(encoder)
            self.heads[task].load_state_dict(head)


def _builder(unit: type):
    def build(*, encoder: Encoder, tasks: Sequence[str], auxiliary: Sequence[str] = (), channels: Mapping[str, int],
              head: str = "multiscale", head_channels: int = 256, aspp_rates: Sequence[int] = (12, 24, 36),
              **_: object) -> StageFusionNet:
        return StageFusionNet(encoder, tasks=tasks, auxiliary=auxiliary, channels=channels, unit=unit, head=head,
                              head_channels=head_channels, aspp_rates=aspp_rates)

    return build


ARCHITECTURES.register("cross_stitch")(_builder(CrossStitchUnit))
ARCHITECTURES.register("nddr")(_builder(NDDRUnit))
