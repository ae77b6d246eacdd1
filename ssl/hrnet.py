"""HRNetV2 backbone (Wang et al., "Deep High-Resolution Representation Learning for Visual Recognition", 2019).

Layout of HRNetV2-W18 (``width=18``, ``hrnet18_full``; ``hrnet18`` is HRNetV2-W18-Small-v2, in brackets, the
backbone of the published multi-task code, ~3.9M parameters):

* stem: two 3x3 stride-2 conv-BN-ReLU, 64 channels (stride 4)
* ``layer1``: 4 [2] Bottleneck blocks (64 planes, 256 out)
* ``transition1`` -> 2 branches (18, 36); ``stage2``: 1 [1] module
* ``transition2`` -> 3 branches (18, 36, 72); ``stage3``: 4 [3] modules
* ``transition3`` -> 4 branches (18, 36, 72, 144); ``stage4``: 3 [2] modules

Every module runs 4 [2] BasicBlocks per branch, then fuses all resolutions: a coarser branch enters a finer one
through a 1x1 conv-BN and nearest upsampling, a finer branch enters a coarser one through a chain of stride-2
3x3 conv-BN(-ReLU); the sum is passed through ReLU. All four branches of the last module are outputs (HRNetV2).

Interface (as :class:`selfsup.backbones.ResNetBackbone`):

* ``forward_features(x)`` -> the 4 branch maps at strides (4, 8, 16, 32), channels (W, 2W, 4W, 8W)
* ``forward_dense(x, stage)`` -> branch ``stage - 1`` of the last module (stride ``4 * 2 ** (stage - 1)``);
  the whole network runs for every stage, because every branch depends on all the others through the fusions
* ``forward(x)`` -> HRNetV2 representation pooled: the 4 branches bilinearly upsampled to stride 4, concatenated
  (15W = 270 channels for W18) and globally average-pooled

Only ``output_stride=32`` exists (the stride-4 branch is kept at full resolution throughout; there is no dilated
variant). Random initialisation only; nothing is downloaded.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

NormLayer = Callable[[int], nn.Module]

# (number of modules, number of branches) of stages 2, 3, 4
_STAGES = ((1, 2), (4, 3), (3, 4))
_BLOCKS_PER_BRANCH = 4
# HRNetV2-W18-Small-v2 (HRNet's w18_small_v2 config): 2 Bottlenecks in stage 1, 1/3/2 modules of 2 BasicBlocks
SMALL_V2 = dict(stage1_blocks=2, stages=((1, 2), (3, 3), (2, 4)), blocks_per_branch=2)


def _conv_bn(cin: int, cout: int, norm: NormLayer, *, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), norm(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class HRModule(nn.Module):
    """Parallel branches of BasicBlocks followed by the multi-resolution fusion."""

    def __init__(self, channels: Sequence[int], norm: NormLayer, num_blocks: int = _BLOCKS_PER_BRANCH) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c, c, norm_layer=norm) for _ in range(num_blocks)]) for c in channels)
        self.fuse_layers = nn.ModuleList()
        for i, c_out in enumerate(channels):  # output branch i
            row = nn.ModuleList()
            for j, c_in in enumerate(channels):  # input branch j
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # coarser -> finer: 1x1 conv-BN here, upsampled in forward
                    row.append(_conv_bn(c_in, c_out, norm, kernel=1, relu=False))
                else:  # finer -> coarser: (i - j) stride-2 3x3 convs, the last one changes channels, no ReLU
                    steps = [_conv_bn(c_in, c_in, norm, stride=2) for _ in range(i - j - 1)]
                    steps.append(_conv_bn(c_in, c_out, norm, stride=2, relu=False))
                    row.append(nn.Sequential(*steps))
            self.fuse_layers.append(row)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        ys = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            size = ys[i].shape[-2:]
            total = ys[i]
            for j, layer in enumerate(row):
                if j == i:
                    continue
                z = layer(ys[j])
                if j > i:
                    z = F.interpolate(z, size=size, mode="nearest")
                total = total + z
            out.append(self.relu(total))
        return out


class HRNetBackbone(nn.Module):
    """HRNetV2 with width ``width`` (18 for HRNetV2-W18), without any head; ``stage1_blocks``, ``stages``
    ((modules, branches) of stages 2-4) and ``blocks_per_branch`` give the depth (``SMALL_V2``: W18-Small-v2)."""

    def __init__(self, *, width: int = 18, output_stride: int = 32, zero_init_residual: bool = False,
                 norm_layer: Optional[NormLayer] = None, stage1_blocks: int = 4,
                 stages: Sequence[Sequence[int]] = _STAGES, blocks_per_branch: int = _BLOCKS_PER_BRANCH) -> None:
        super().__init__()
        if output_stride != 32:
            raise ValueError(f"HRNet supports only output_stride=32 (its stride-4 branch already keeps full "
                             f"resolution; there is no dilated variant), got output_stride={output_stride}")
        norm: NormLayer = norm_layer or nn.BatchNorm2d
        self.output_stride = output_stride
        self.feature_channels: List[int] = [width * 2 ** i for i in range(4)]
        self.feature_strides: List[int] = [4, 8, 16, 32]
        self.num_features = sum(self.feature_channels)  # HRNetV2: concatenation of the 4 branches

        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = norm(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), norm(256))
        self.layer1 = nn.Sequential(Bottleneck(64, 64, downsample=down, norm_layer=norm),
                                    *[Bottleneck(256, 64, norm_layer=norm) for _ in range(stage1_blocks - 1)])

        previous = [256]
        for s, (num_modules, num_branches) in enumerate(stages, start=2):
            channels = self.feature_channels[:num_branches]
            setattr(self, f"transition{s - 1}", self._transition(previous, channels, norm))
            setattr(self, f"stage{s}", nn.Sequential(*[HRModule(channels, norm, blocks_per_branch)
                                                       for _ in range(num_modules)]))
            previous = channels

        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # norm layers keep their default init (weight 1, bias 0)
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # each residual branch starts as zero (as torchvision's ResNet)
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.zeros_(m.bn2.weight)

    @staticmethod
    def _transition(previous: Sequence[int], channels: Sequence[int], norm: NormLayer) -> nn.ModuleList:
        """Branch k of the next stage: branch k of the previous one (a 3x3 conv if the width changes), or a new,
        coarser branch made from the previous stage's last branch by a stride-2 3x3 conv."""
        layers = nn.ModuleList()
        for k, c in enumerate(channels):
            if k < len(previous):
                layers.append(nn.Identity() if previous[k] == c else _conv_bn(previous[k], c, norm))
            else:
                layers.append(nn.Sequential(_conv_bn(previous[-1], c, norm, stride=2)))
        return layers

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]
        for s in (2, 3, 4):
            transition = getattr(self, f"transition{s - 1}")
            xs = [t(xs[k] if k < len(xs) else xs[-1]) for k, t in enumerate(transition)]
            xs = getattr(self, f"stage{s}")(xs)
        return xs  # strides self.feature_strides

    def forward_dense(self, x: torch.Tensor, stage: int = 4) -> torch.Tensor:
        """Branch ``stage - 1`` of the last module: stride ``4 * 2 ** (stage - 1)`` (the whole network runs)."""
        if stage not in (1, 2, 3, 4):
            raise ValueError(f"stage must be 1..4, got {stage}")
        return self.forward_features(x)[stage - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.forward_features(x)
        size = feats[0].shape[-2:]
        up = [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        return torch.flatten(F.adaptive_avg_pool2d(torch.cat(up, dim=1), 1), 1)
