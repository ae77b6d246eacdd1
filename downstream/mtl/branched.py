"""Branched multi-task network: the backbone split into segments at branch points, one copy per branch.

The backbone is cut into *pieces* (stem, stage 1..4; :func:`backbone_pieces`). Branch point d ends segment d
(segment 1 starts with the stem; stages after the last branch point join the last segment). Partition d of the
tree (``model.branching[d]``) groups the tasks that share segment d: each cluster owns one copy of its pieces
and reads the output of its parent cluster (the one of partition d − 1 that contains it). Each cluster of the
last partition (a leaf) owns one neck (FPN) on the 4 maps of its path, and the heads of its tasks.

* all tasks in every partition = the MTL baseline (one backbone, one FPN, one head per task);
* singletons from the first partition on = the single-task set (the stem belongs to segment 1).

Every copy starts from the same weights: the template backbone's (random init, or ``--weights`` via
:meth:`BranchedNetwork.load_backbone_weights`).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from selfsup.backbones import ResNetBackbone
from selfsup.checkpoint import load_backbone_weights as load_into_backbone
from selfsup.config import ConfigError
from selfsup.hrnet import HRNetBackbone

from .balancers.base import SharedParts
from .encoder import Encoder
from .flops import count_parameters
from .heads import build_head
from .layers import resize
from .components import ARCHITECTURES
from .tree_search import ComponentSizes, Tree, validate_tree

NUM_STAGES = 4


class _HRNetStem(nn.Module):
    def __init__(self, net: HRNetBackbone) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2, self.relu = net.conv1, net.bn1, net.conv2, net.bn2, net.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class _HRNetFirstStage(nn.Module):
    def __init__(self, layer1: nn.Module) -> None:
        super().__init__()
        self.layer1 = layer1

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [self.layer1(x)]


class _HRNetStage(nn.Module):
    """Transition (new coarser branch) + the stage's HR modules: a list of maps in, a longer list out."""

    def __init__(self, transition: nn.ModuleList, stage: nn.Module) -> None:
        super().__init__()
        self.transition, self.stage = transition, stage

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        return self.stage([t(xs[k] if k < len(xs) else xs[-1]) for k, t in enumerate(self.transition)])


def backbone_pieces(backbone: nn.Module) -> List[nn.Module]:
    """[stem, stage1, ..., stage4] of a ResNet or HRNet backbone, sharing the backbone's modules (no copies)."""
    if isinstance(backbone, ResNetBackbone):
        b = backbone
        return [nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool), b.layer1, b.layer2, b.layer3, b.layer4]
    if isinstance(backbone, HRNetBackbone):
        b = backbone
        return [_HRNetStem(b), _HRNetFirstStage(b.layer1),
                *[_HRNetStage(getattr(b, f"transition{s - 1}"), getattr(b, f"stage{s}")) for s in (2, 3, 4)]]
    raise ConfigError(f"branched networks need a ResNet or HRNet backbone, got {type(backbone).__name__}")


def stage_maps(backbone: nn.Module, outputs: Sequence[Any]) -> List[torch.Tensor]:
    """The 4 multi-scale maps from the outputs of stages 1..4 (HRNet: the 4 branches of the last stage)."""
    return list(outputs[-1]) if isinstance(backbone, HRNetBackbone) else list(outputs)


def stage_outputs(backbone: nn.Module, x: torch.Tensor, last: int = NUM_STAGES) -> List[Any]:
    """Outputs of stages 1..``last`` (a map each for a ResNet, a list of maps for HRNet): the branch-point features."""
    pieces = backbone_pieces(backbone)
    x = pieces[0](x)
    outs = []
    for piece in pieces[1:last + 1]:
        x = piece(x)
        outs.append(x)
    return outs


def pooling_above(backbone: nn.Module, branch_points: Sequence[int]) -> List[int]:
    """p_d: stride-2 reductions between branch point d and the backbone output (0 where dilation keeps the size)."""
    strides = list(backbone.feature_strides)
    return [int(round(math.log2(strides[-1] / strides[p - 1]))) for p in branch_points]


def segment_pieces(branch_points: Sequence[int]) -> List[List[int]]:
    """Piece indices of each segment: segment d ends at stage branch_points[d]; the tail joins the last one."""
    segments, start = [], 0
    for p in branch_points:
        segments.append(list(range(start, p + 1)))
        start = p + 1
    segments[-1] += list(range(start, NUM_STAGES + 1))
    return segments


def check_branch_points(branch_points: Sequence[int], key: str = "model.branch_points") -> List[int]:
    points = [int(p) for p in branch_points]
    if not points or points != sorted(set(points)) or not all(1 <= p <= NUM_STAGES for p in points):
        raise ConfigError(f"{key}: expected increasing backbone stages in 1..{NUM_STAGES}, got {list(branch_points)}")
    return points


class BranchedNetwork(nn.Module):
    def __init__(self, encoder: Encoder, *, tree: Tree, branch_points: Sequence[int], tasks: Sequence[str],
                 auxiliary: Sequence[str], channels: Mapping[str, int], head: str = "multiscale",
                 head_channels: int = 256, aspp_rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__()
        self.tasks, self.auxiliary = tuple(tasks), tuple(auxiliary)
        self.tree, self.branch_points = tree, list(branch_points)
        self._template = [encoder.backbone]  # a list: not a submodule (only used to load weights into the copies)
        self.segment_pieces = segment_pieces(branch_points)
        pieces = backbone_pieces(encoder.backbone)
        # segments[d][c]: copy of segment d's pieces for cluster c of partition d
        self.segments = nn.ModuleList(
            nn.ModuleList(nn.ModuleList(copy.deepcopy(pieces[i]) for i in idx) for _ in partition)
            for idx, partition in zip(self.segment_pieces, tree))
        self.parents = [[0] * len(tree[0])] + [
            [next(j for j, big in enumerate(tree[d - 1]) if set(c) <= set(big)) for c in tree[d]] for d in range(1, len(tree))]
        self.necks = nn.ModuleList(copy.deepcopy(encoder.neck) if encoder.neck is not None else nn.Identity()
                                   for _ in tree[-1])
        self.heads = nn.ModuleDict({t: build_head(head, in_channels=encoder.channels, num_outputs=channels[t],
                                                  channels=head_channels, rates=aspp_rates)
                                    for t in (*self.tasks, *self.auxiliary)})

    def forward(self, x: torch.Tensor) -> Dict[str, object]:
        size = x.shape[-2:]
        branches: List[Tuple[Any, List[Any]]] = [(x, [])]  # per cluster: (state, outputs of stages 1..)
        for d, (idx, copies) in enumerate(zip(self.segment_pieces, self.segments)):
            grown = []
            for c, pieces in enumerate(copies):
                state, outs = branches[self.parents[d][c]]
                outs = list(outs)
                for i, piece in zip(idx, pieces):
                    state = piece(state)
                    if i >= 1:  # after the stem: a stage output
                        outs.append(state)
                grown.append((state, outs))
            branches = grown
        preds: Dict[str, torch.Tensor] = {}
        for leaf, (neck, (_, outs)) in enumerate(zip(self.necks, branches)):
            feats = neck(stage_maps(self._template[0], outs))
            for t in self.tree[-1][leaf]:
                preds[t] = resize(self.heads[t](feats), size)
        auxiliary = {t: preds[t] for t in self.auxiliary}
        return {"final": {t: preds[t] for t in self.tasks}, "initial": [auxiliary] if auxiliary else []}

    def shared_depth(self) -> int:
        """How many leading segments every task goes through (0 when the first partition already splits)."""
        return next((d for d, partition in enumerate(self.tree) if len(partition) > 1), len(self.tree))

    def shared_modules(self) -> List[nn.Module]:
        """The segments every task goes through (the first holds the stem), plus the neck when the tree never
        splits (then they are exactly the MTL baseline's encoder); empty when the first partition splits."""
        depth = self.shared_depth()
        return [self.segments[d] for d in range(depth)] + ([self.necks[0]] if depth == len(self.tree) else [])

    def shared_parameters(self) -> List[nn.Parameter]:
        """Parameters of :meth:`shared_modules` (empty when the first partition already splits)."""
        return [p for m in self.shared_modules() for p in m.parameters()]

    def shared_parts(self, *, capture_representation: bool = False) -> SharedParts:
        """What the balancers touch. Shared parameters: :meth:`shared_parameters`; last shared layer: the FPN's
        output convs when the neck is shared, else the last conv of the deepest shared segment; representation:
        the output of the deepest shared module (the neck's maps, else the deepest shared stage's output)."""
        modules = self.shared_modules()
        if not modules:
            raise ValueError(f"model.branching splits the tasks at the first branch point ({list(map(list, self.tree[0]))}): "
                             "every branch has its own stem, no layer is shared by all tasks")
        params = [p for p in self.shared_parameters() if p.requires_grad]
        ids = {id(p) for p in params}
        other = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        output_layers = getattr(modules[-1], "output", None)  # a shared FPN
        if output_layers is None:
            output_layers = [m for seg in modules for m in seg.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1:]
        last = [p for m in output_layers for p in m.parameters() if p.requires_grad]
        parts = SharedParts(params=params, last_layer=last, other=other)
        if capture_representation:
            neck_shared = self.shared_depth() == len(self.tree)
            parts.capture_output_of(self.necks[0] if neck_shared else self.segments[self.shared_depth() - 1][0][-1])
        return parts

    def load_backbone_weights(self, source: Union[str, Mapping[str, Any]]) -> None:
        """Initialise every branch from the same backbone weights (any format ``load_backbone_weights`` reads)."""
        template = self._template[0]
        load_into_backbone(template, source)
        pieces = backbone_pieces(template)
        for idx, copies in zip(self.segment_pieces, self.segments):
            for cluster_pieces in copies:
                for i, piece in zip(idx, cluster_pieces):
                    piece.load_state_dict(pieces[i].state_dict())


def component_sizes(model: BranchedNetwork, input_size: Tuple[int, int]) -> ComponentSizes:
    """Params and FLOPs of one copy of each segment, of one neck and of each head (run piece by piece)."""
    from torch.utils.flop_counter import FlopCounterMode

    def measure(module: nn.Module, *inputs: Any) -> Tuple[Dict[str, int], Any]:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = module(*inputs)
        return {"params": count_parameters(module), "flops": int(counter.get_total_flops())}, out

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    state: Any = torch.zeros(1, 3, *input_size, device=device)
    outs: List[Any] = []
    segments = []
    for idx, copies in zip(model.segment_pieces, model.segments):
        size = {"params": 0, "flops": 0}
        for i, piece in zip(idx, copies[0]):
            cost, state = measure(piece, state)
            size = {k: size[k] + cost[k] for k in size}
            if i >= 1:
                outs.append(state)
        segments.append(size)
    neck, feats = measure(model.necks[0], stage_maps(model._template[0], outs))
    heads = {t: measure(h, feats)[0] for t, h in model.heads.items()}
    model.train(was_training)
    return ComponentSizes(tuple(segments), neck, heads)


@ARCHITECTURES.register("branched")
def branched(*, encoder: Encoder, tasks: Sequence[str], auxiliary: Sequence[str] = (), channels: Mapping[str, int],
             head: str = "multiscale", head_channels: int = 256, aspp_rates: Sequence[int] = (12, 24, 36),
             branching: Sequence = (), branch_points: Sequence[int] = (1, 2, 3, 4), **_: object) -> BranchedNetwork:
    """Tree of backbone copies (``model.branching``: a task partition per branch point), heads on the leaves."""
    points = check_branch_points(branch_points)
    if not branching:
        raise ConfigError("model.branching is empty: give one task partition per branch point, e.g. "
                          "[[[semseg, depth]], [[semseg], [depth]], ...] (downstream/branch.py writes it)")
    try:
        tree = validate_tree(branching, (*tasks, *auxiliary), len(points))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return BranchedNetwork(encoder, tree=tree, branch_points=points, tasks=tasks, auxiliary=auxiliary, channels=channels,
                           head=head, head_channels=head_channels, aspp_rates=aspp_rates)
