"""Encoder-focused multi-task networks with one backbone per task, fused after every stage.

* ``cross_stitch`` (Misra et al., CVPR 2016): after stage s, task t continues with
  ``x̃_t = Σ_k α^s_{t,k} ⊙ x_k`` (α per channel).
* ``nddr`` (Gao et al., CVPR 2019, NDDR-CNN): after stage s, task t continues with
  ``ReLU(BN(W_t [x_1; ...; x_T]))`` (1x1 conv over the concatenated task features).

Defaults as MTLP (``utils/common_config.py``, ``models/{cross_stitch,nddr_cnn}.py``): the fusion units start at
0.9 on the own task and 0.1 on every other task (α; NDDR: 0.9·I / 0.1·I blocks), train at 100× the lr
(:meth:`StageFusionNet.param_groups`), NDDR's BN momentum is 0.05 and NDDR also fuses after the stem (5 fusion
points; cross-stitch after the 4 stages). ``init="split"`` (0.1 split over the others), ``fusion_lr_scale=1``,
``nddr_bn_momentum=0.1`` and ``nddr_stem=False`` give the earlier behaviour (``model.fusion.*``).

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
from .components import ARCHITECTURES
from .task_conditioning import check_resnet, resnet_stage


FUSION_INITS = ("published", "split")


def own_task_init(num_tasks: int, own: float = 0.9, *, init: str = "published") -> torch.Tensor:
    """[T, T] mixing weights: ``own`` on the diagonal; off the diagonal ``1 - own`` for every other task
    (``published``, MTLP's alpha/beta = 0.9/0.1) or ``1 - own`` split over the other tasks (``split``)."""
    if init not in FUSION_INITS:
        raise ValueError(f"model.fusion.init={init!r}: expected one of {', '.join(FUSION_INITS)}")
    if num_tasks == 1:
        return torch.ones(1, 1)
    other = (1.0 - own) if init == "published" else (1.0 - own) / (num_tasks - 1)
    return torch.full((num_tasks, num_tasks), other).fill_diagonal_(own)


class CrossStitchUnit(nn.Module):
    """α [T, T, C]: output t = Σ_k α[t, k] ⊙ input k (per channel)."""

    def __init__(self, num_tasks: int, channels: int, *, init: str = "published", **_: object) -> None:
        super().__init__()
        self.alpha = nn.Parameter(own_task_init(num_tasks, init=init)[:, :, None].repeat(1, 1, channels))

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        stacked = torch.stack(feats, dim=1)  # [B, T, C, H, W]
        mixed = torch.einsum("tkc,bkchw->btchw", self.alpha, stacked)
        return list(mixed.unbind(dim=1))


class NDDRUnit(nn.Module):
    """Per task: concat the T task features -> 1x1 conv (T·C -> C) -> BN -> ReLU."""

    def __init__(self, num_tasks: int, channels: int, *, init: str = "published", bn_momentum: float = 0.05,
                 **_: object) -> None:
        super().__init__()
        weights = own_task_init(num_tasks, init=init)
        eye = torch.eye(channels)
        self.reduce = nn.ModuleList()
        for t in range(num_tasks):
            conv = nn.Conv2d(num_tasks * channels, channels, 1, bias=False)
            with torch.no_grad():  # weight [C, T·C, 1, 1]: block k = weights[t, k] · I
                conv.weight.copy_(torch.cat([weights[t, k] * eye for k in range(num_tasks)], dim=1)[:, :, None, None])
            self.reduce.append(nn.Sequential(conv, nn.BatchNorm2d(channels, momentum=bn_momentum), nn.ReLU(inplace=True)))

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        cat = torch.cat(feats, dim=1)
        return [reduce(cat) for reduce in self.reduce]


def _stem(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))


class StageFusionNet(nn.Module):
    """One encoder copy per task; ``fusion[i]`` mixes the task features after fusion point i: the 4 stages, with
    ``stem_fusion`` the stem (conv1-bn-relu-maxpool) first (NDDR as in MTLP: 5 points)."""

    def __init__(self, encoder: Encoder, *, tasks: Sequence[str], auxiliary: Sequence[str], channels: Mapping[str, int],
                 unit: type, head: str = "multiscale", head_channels: int = 256,
                 aspp_rates: Sequence[int] = (12, 24, 36), init: str = "published", fusion_lr_scale: float = 100.0,
                 stem_fusion: bool = False, nddr_bn_momentum: float = 0.05) -> None:
        super().__init__()
        check_resnet(encoder.backbone, "cross_stitch / nddr")
        self.tasks, self.auxiliary = tuple(tasks), tuple(auxiliary)
        self.all_tasks = (*self.tasks, *self.auxiliary)
        self.branches = nn.ModuleDict({t: copy.deepcopy(encoder) for t in self.all_tasks})
        T = len(self.all_tasks)
        self.stem_fusion, self.fusion_lr_scale = bool(stem_fusion), float(fusion_lr_scale)
        widths = ([encoder.backbone.conv1.out_channels] if stem_fusion else []) + list(encoder.backbone.feature_channels)
        self.fusion = nn.ModuleList(unit(T, c, init=init, bn_momentum=nddr_bn_momentum) for c in widths)
        self.heads = nn.ModuleDict({t: build_head(head, in_channels=encoder.channels, num_outputs=channels[t],
                                                  channels=head_channels, rates=aspp_rates) for t in self.all_tasks})

    def forward(self, x: torch.Tensor) -> Dict[str, object]:
        nets = [self.branches[t] for t in self.all_tasks]
        per_task: List[List[torch.Tensor]] = [[] for _ in nets]  # [task][stage]
        xs = [x] * len(nets)
        fusion = iter(self.fusion)
        if self.stem_fusion:  # the stem's output is fused, then layer1 runs without the stem
            xs = next(fusion)([_stem(net.backbone, xi) for net, xi in zip(nets, xs)])
        for s, fuse in enumerate(fusion):
            if self.stem_fusion:
                xs = [getattr(net.backbone, f"layer{s + 1}")(xi) for net, xi in zip(nets, xs)]
            else:
                xs = [resnet_stage(net.backbone, s, xi) for net, xi in zip(nets, xs)]
            xs = fuse(xs)
            for i, xi in enumerate(xs):
                per_task[i].append(xi)
        preds = {}
        for t, net, feats in zip(self.all_tasks, nets, per_task):
            feats = net.neck(feats) if net.neck is not None else feats
            preds[t] = resize(self.heads[t](feats), x.shape[-2:])
        auxiliary = {t: preds[t] for t in self.auxiliary}
        return {"final": {t: preds[t] for t in self.tasks}, "initial": [auxiliary] if auxiliary else []}

    def param_groups(self) -> List[Dict[str, object]]:
        """The fusion units (α, NDDR convs and BN) at ``fusion_lr_scale`` × lr (MTLP: 100), the rest at lr."""
        fusion = {id(p) for p in self.fusion.parameters()}
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if id(p) not in fusion], "lr_scale": 1.0},
                {"params": [p for p in params if id(p) in fusion], "lr_scale": self.fusion_lr_scale}]

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


def _builder(unit: type, *, stem: bool):
    def build(*, encoder: Encoder, tasks: Sequence[str], auxiliary: Sequence[str] = (), channels: Mapping[str, int],
              head: str = "multiscale", head_channels: int = 256, aspp_rates: Sequence[int] = (12, 24, 36),
              fusion_options=None, **_: object) -> StageFusionNet:
        o = fusion_options
        kw = {} if o is None else dict(init=o.init, fusion_lr_scale=o.lr_scale, nddr_bn_momentum=o.nddr_bn_momentum)
        return StageFusionNet(encoder, tasks=tasks, auxiliary=auxiliary, channels=channels, unit=unit, head=head,
                              head_channels=head_channels, aspp_rates=aspp_rates,
                              stem_fusion=stem and (True if o is None else o.nddr_stem), **kw)

    return build


ARCHITECTURES.register("cross_stitch")(_builder(CrossStitchUnit, stem=False))
ARCHITECTURES.register("nddr")(_builder(NDDRUnit, stem=True))
