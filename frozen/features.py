"""Frozen backbones for every evaluation protocol: build by name, load weights, extract features.

One way, shared by the kNN/linear/SVM probes, DAVIS label propagation, segment retrieval and the online
monitors of a pretraining run:

* :func:`frozen_backbone` builds ``--arch``, loads ``--weights`` (any file
  :func:`selfsup.checkpoint.load_backbone_weights` reads, or ``none`` = random init), puts it in eval mode
  (BN statistics frozen) without gradients, on CUDA when there is one;
* :class:`DenseFeatures` gives L2-normalised dense maps at stride 8: a ResNet built with
  ``output_stride=8`` (layer3/layer4 strides traded for dilation) read at layer3 (layer4 is not run);
  HRNet's stride-8 branch;
* pooled features come from :func:`frozen.knn.extract_features`;
* :func:`add_common_args` adds the flags every evaluation entry point shares.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from selfsup.backbones import ResNetBackbone, build_backbone
from selfsup.checkpoint import load_backbone_weights
from frozen.knn import IMAGENET_MEAN, IMAGENET_STD

DENSE_STRIDE = 8


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def freeze(backbone: nn.Module) -> nn.Module:
    """Eval mode (BN frozen) and no gradients."""
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def frozen_backbone(arch: str, weights: str, *, dense: bool = False,
                    device: Optional[torch.device] = None) -> nn.Module:
    """``arch`` with ``weights`` ('none' = random init) in eval mode on ``device`` (default: CUDA if available).

    ``dense=True`` builds ResNets at ``output_stride=8`` (dilated layer3/4) for :class:`DenseFeatures`.
    """
    kwargs = {"output_stride": DENSE_STRIDE} if dense and not arch.startswith("hrnet") else {}
    backbone = build_backbone(arch, **kwargs)
    if weights != "none":
        load_backbone_weights(backbone, weights)
    return freeze(backbone).to(device or default_device())


def backbone_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class DenseFeatures(nn.Module):
    """``images`` [B,3,H,W] (0..1) -> L2-normalised features [B, C, ceil(H/8), ceil(W/8)].

    Images are normalised with the ImageNet statistics and zero-padded (after normalisation) on the
    right/bottom to a multiple of 8, so feature cell (i, j) covers pixels [8i, 8i+8) x [8j, 8j+8).
    """

    stride = DENSE_STRIDE

    def __init__(self, backbone: nn.Module, *, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if isinstance(backbone, ResNetBackbone):
            if backbone.output_stride != DENSE_STRIDE:
                raise ValueError(f"dense features need a ResNet built with output_stride={DENSE_STRIDE}, got "
                                 f"{backbone.output_stride} (use frozen_backbone(..., dense=True))")
            self.stage = 3  # layer3 output at stride 8; layer4 is not run
        else:
            strides = getattr(backbone, "feature_strides", None)
            if not strides or DENSE_STRIDE not in strides:
                raise ValueError(f"{type(backbone).__name__} has no stride-{DENSE_STRIDE} feature map")
            self.stage = strides.index(DENSE_STRIDE) + 1
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = (images.to(self.mean.device, torch.float32) - self.mean) / self.std
        H, W = images.shape[-2:]
        images = F.pad(images, (0, -W % self.stride, 0, -H % self.stride))
        feats = self.backbone.forward_dense(images, self.stage).float()
        return F.normalize(feats, dim=1)


def dense_extractor(arch: str, weights: str, *, device: Optional[torch.device] = None) -> DenseFeatures:
    """:class:`DenseFeatures` of a frozen ``arch`` loaded from ``weights``."""
    backbone = frozen_backbone(arch, weights, dense=True, device=device)
    return DenseFeatures(backbone).to(backbone_device(backbone))


def dense_from_backbone(backbone: nn.Module, *, arch: Optional[str] = None) -> DenseFeatures:
    """Dense features of a live (training) backbone: a frozen stride-8 copy when it is a stride-32 ResNet."""
    device = backbone_device(backbone)
    if isinstance(backbone, ResNetBackbone) and backbone.output_stride != DENSE_STRIDE:
        if arch is None:
            raise ValueError("arch is needed to rebuild a stride-32 ResNet at stride 8")
        copy = build_backbone(arch, output_stride=DENSE_STRIDE)
        copy.load_state_dict(backbone.state_dict())  # dilation changes no parameter shapes
        backbone = copy
    return DenseFeatures(freeze(backbone)).to(device)


def in_chunks(frames: torch.Tensor, model: nn.Module, chunk: int) -> torch.Tensor:
    """``model`` applied to ``frames`` [T, ...] ``chunk`` at a time, outputs concatenated."""
    return torch.cat([model(frames[i:i + chunk]) for i in range(0, frames.shape[0], chunk)])


def upsample_cells(x: torch.Tensor, size: Sequence[int], stride: int = DENSE_STRIDE) -> torch.Tensor:
    """[B, C, h, w] per-cell values -> [B, C, H, W]: bilinear x ``stride`` (cells of ``DenseFeatures``), cropped."""
    up = F.interpolate(x, scale_factor=stride, mode="bilinear", align_corners=False)
    return up[..., :size[0], :size[1]]


def cell_fractions(labels: torch.Tensor, num_classes: int, stride: int = DENSE_STRIDE,
                   ignore_index: int = 255) -> torch.Tensor:
    """[H, W] int labels -> [num_classes, ceil(H/8), ceil(W/8)]: each class's share of every 8x8 cell's pixels
    (void and padding pixels count for no class)."""
    H, W = labels.shape
    one_hot = torch.zeros(num_classes, H, W)
    valid = (labels != ignore_index) & (labels < num_classes)
    one_hot[labels[valid].long(), valid.nonzero(as_tuple=True)[0], valid.nonzero(as_tuple=True)[1]] = 1.0
    one_hot = F.pad(one_hot, (0, -W % stride, 0, -H % stride))
    return F.avg_pool2d(one_hot[None], stride)[0]


def add_common_args(parser: argparse.ArgumentParser, *, data_help: str, output_help: Optional[str] = None,
                    default_arch: str = "resnet50", weights_required: bool = True) -> argparse.ArgumentParser:
    """The flags every evaluation entry point shares: --weights, --arch, --data-root, --output-dir.

    ``weights_required=False`` for entry points that can run without a backbone (they check it themselves)."""
    parser.add_argument("--weights", required=weights_required, default=None,
                        help="backbone weights: our checkpoint.pth, an exported torchvision/detectron2 file, an "
                             "official MoCo checkpoint, or 'none' (random initialisation)")
    parser.add_argument("--arch", default=default_arch,
                        help=f"backbone name (default {default_arch}; resnet18/34/50/101, hrnet18, resnet_small, "
                             "resnet_tiny); must match the weights")
    parser.add_argument("--data-root", default="embedded", help=data_help + " (default: the embedded data)")
    if output_help is not None:
        parser.add_argument("--output-dir", default=None, help=output_help)
    return parser
