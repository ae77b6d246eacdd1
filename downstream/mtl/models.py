"""Build a multi-task model by architecture name (registry) on the shared encoder."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from . import astmt, baseline, branched, encoder_fusion, mtan, mti_net, pad_net  # noqa: F401  (register the architectures)
from .encoder import build_encoder
from .layers import PredictionConv
from .components import ARCHITECTURES
from .tasks import TaskSet


def build_model(arch: str, *, tasks: TaskSet, backbone: str = "resnet18", output_stride: int = 32, neck: str = "fpn",
                fpn_channels: int = 256, head: str = "multiscale", head_channels: int = 256, task_channels: int = 64,
                aspp_rates: Sequence[int] = (12, 24, 36), widths: str = "narrow", fpm_softmax: str = "task",
                fpm_reduction: int = 0, **arch_options: object) -> nn.Module:
    """E.g. ``build_model("mti_net", tasks=TaskSet("nyud", ("semseg", "depth"), ("normals", "edge")))``.

    ``widths`` ('narrow' | 'published'), ``fpm_softmax`` ('task' | 'published') and ``fpm_reduction`` (MTI-Net's
    FPM width divisor, 0 = the widths' default) reach the architectures that have them (PAD-Net, MTI-Net; see
    docs/mtl.md). The model maps images [B,3,H,W] to
    ``{'final': {main task: [B,c,H,W]}, 'initial': [{task: [B,c,H,W]}, ...]}``.
    ``arch_options`` go to the architecture's builder only (e.g. ``astmt_options`` for ASTMT;
    ``branching``, ``branch_points`` for ``branched``).
    """
    builder = ARCHITECTURES.get(arch)  # fail before building the encoder on an unknown name
    encoder = build_encoder(backbone=backbone, output_stride=output_stride, neck=neck, fpn_channels=fpn_channels)
    return builder(encoder=encoder, tasks=tasks.main, auxiliary=tasks.auxiliary, channels=tasks.channels(), head=head,
                   head_channels=head_channels, task_channels=task_channels, aspp_rates=tuple(aspp_rates),
                   widths=widths, fpm_softmax=fpm_softmax, fpm_reduction=fpm_reduction, **arch_options)


def init_output_bias(model: nn.Module, task: str, value: float) -> int:
    """Set the bias of every prediction layer of ``task`` (initial and final) to ``value``; returns how many.

    A depth output that starts at 0 m needs many steps just to reach the scene's typical depth; starting it at
    the training set's mean depth spends them on the structure instead. Prediction layers are the
    :class:`PredictionConv` modules below a ``ModuleDict`` entry named ``task``.
    """
    layers = []
    for module in model.modules():
        if isinstance(module, nn.ModuleDict) and task in module:
            layers += [m for m in module[task].modules() if isinstance(m, PredictionConv)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no prediction layer for task {task!r}")
    for layer in layers:
        nn.init.constant_(layer.bias, value)
    return len(layers)


def architecture_names() -> list:
    return ARCHITECTURES.names()
