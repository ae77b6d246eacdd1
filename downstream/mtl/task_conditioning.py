"""Pieces shared by the task-conditioned architectures (ASTMT, MTAN, cross-stitch, NDDR).

* :class:`TaskModules` - a ``ModuleDict`` keyed by task whose entries only that task's forward pass uses;
  :func:`task_specific_parameters` finds them (tests check they get gradients from their own task only).
* :class:`TaskSE` - per-task squeeze-and-excitation that starts as the identity (``x * 2σ(0) = x``).
* :class:`TaskConditionedBlock` - a torchvision Basic/Bottleneck block with per-task SE, per-task residual
  adapters (a 1x1 conv parallel to every 3x3 conv, zero-initialised) and optionally per-task BN
  (:class:`TaskBatchNorm`, copies of the block's BN) that keeps the block's conv names, so a plain backbone
  checkpoint loads into the shared layers (:func:`expand_task_norm_weights` fans its BN out to every task).
* :func:`grad_reverse` - the gradient-reversal layer (identity forward, ``-scale * grad`` backward).
* :func:`resnet_stage` - run one stage of a ``ResNetBackbone`` (the stem belongs to stage 0).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet as tv_resnet


class TaskModules(nn.ModuleDict):
    """Modules of one kind, one per task; entry ``t`` is used by task ``t``'s forward pass only."""


def task_specific_parameters(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """``{task: parameters of every TaskModules entry of that task}``."""
    params: Dict[str, List[nn.Parameter]] = {}
    for module in model.modules():
        if isinstance(module, TaskModules):
            for task, sub in module.items():
                params.setdefault(task, []).extend(sub.parameters())
    return params


class TaskSelector:
    """The task of the current forward pass, shared by every task-conditioned layer of one model.

    A plain object (not a module): the layers read it so the backbone's own ``forward_features`` can run
    unchanged, one pass per task.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)
        self.task: str | None = None

    def current(self) -> str:
        if self.task is None:
            raise RuntimeError("no task selected: run the model through its forward (one pass per task)")
        return self.task


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``-scale`` (Ganin & Lempitsky 2015)."""
    return _GradientReversal.apply(x, scale)


class TaskSE(nn.Module):
    """Per-task squeeze-and-excitation: ``x * 2σ(FC(ReLU(FC(mean(x)))))``, exactly the identity at init.

    The paper copies the ImageNet SE-ResNet's SE weights into every task; our backbones are pretrained
    without SE, so the gate starts at 1 (last FC zero) and the pretrained features pass unchanged.
    """

    def __init__(self, selector: TaskSelector, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.selector = selector
        hidden = max(1, channels // reduction)
        self.gates = TaskModules({t: nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                                   nn.Linear(hidden, channels)) for t in selector.tasks})
        for gate in self.gates.values():
            nn.init.zeros_(gate[-1].weight)
            nn.init.zeros_(gate[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = 2 * torch.sigmoid(self.gates[self.selector.current()](x.mean(dim=(2, 3))))  # [B, C]
        return x * gate[:, :, None, None]


def task_adapters(selector: TaskSelector, conv: nn.Conv2d) -> TaskModules:
    """Residual adapters (Rebuffi et al. 2018, parallel form): a zero-initialised 1x1 conv per task beside ``conv``."""
    adapters = TaskModules({t: nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=False)
                            for t in selector.tasks})
    for a in adapters.values():
        nn.init.zeros_(a.weight)
    return adapters


class TaskBatchNorm(nn.Module):
    """One BN per task (``per_task.<task>``), each a copy of ``bn`` (same weights and statistics at start)."""

    def __init__(self, bn: nn.BatchNorm2d, selector: TaskSelector) -> None:
        super().__init__()
        self.selector = selector
        self.per_task = TaskModules({t: copy.deepcopy(bn) for t in selector.tasks})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.per_task[self.selector.current()](x)


def expand_task_norm_weights(weights: Dict[str, torch.Tensor], model_keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    """A plain backbone state_dict with every ``X.bn.k`` as ``X.bn.per_task.<task>.k`` for each task where the model
    has a :class:`TaskBatchNorm` there (the published code copies the pretrained BN into every task's BN)."""
    out, fanned = dict(weights), set()
    for key in model_keys:
        head, sep, tail = key.partition(".per_task.")
        if sep and key not in out:
            source = f"{head}.{tail.split('.', 1)[1]}"  # drop the task name
            if source in weights:
                out[key] = weights[source]
                fanned.add(source)
    keys = set(model_keys)
    return {k: v for k, v in out.items() if k not in fanned or k in keys}


class TaskConditionedBlock(nn.Module):
    """A torchvision ResNet block with per-task SE (on the residual branch, before the sum) and adapters.

    The block's own modules keep their names (``conv1``, ``bn1``, ..., ``downsample``): the backbone's
    state_dict keys are unchanged, the task-specific ones (``se.*``, ``adapters.*``) are added.
    """

    def __init__(self, block: nn.Module, selector: TaskSelector, *, se: bool = True, adapters: bool = True,
                 task_norm: bool = False, se_reduction: int = 16) -> None:
        super().__init__()
        if not isinstance(block, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)):
            raise TypeError(f"task conditioning needs torchvision Basic/Bottleneck blocks, got {type(block).__name__}")
        self.selector = selector
        self.bottleneck = isinstance(block, tv_resnet.Bottleneck)
        for name, module in block.named_children():
            setattr(self, name, module)
        self.downsample = block.downsample
        if task_norm:  # per-task BN in the block and its shortcut (the published --trNorm True)
            for name in ("bn1", "bn2", "bn3") if self.bottleneck else ("bn1", "bn2"):
                setattr(self, name, TaskBatchNorm(getattr(self, name), selector))
            if self.downsample is not None:
                self.downsample[1] = TaskBatchNorm(self.downsample[1], selector)
        # adapters beside every 3x3 conv: conv2 of a Bottleneck, conv1 and conv2 of a BasicBlock
        self.three_by_three = ["conv2"] if self.bottleneck else ["conv1", "conv2"]
        self.adapters = (nn.ModuleDict({n: task_adapters(selector, getattr(self, n)) for n in self.three_by_three})
                         if adapters else None)
        out_channels = (self.conv3 if self.bottleneck else self.conv2).out_channels
        self.se = TaskSE(selector, out_channels, se_reduction) if se else None

    def _conv(self, name: str, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self, name)(x)
        if self.adapters is not None and name in self.adapters:
            out = out + self.adapters[name][self.selector.current()](x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self._conv("conv1", x)))
        out = self.bn2(self._conv("conv2", out))
        if self.bottleneck:
            out = self.bn3(self.conv3(F.relu(out)))
        if self.se is not None:
            out = self.se(out)
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def condition_resnet(backbone: nn.Module, selector: TaskSelector, **kwargs) -> nn.Module:
    """Replace every block of ``backbone.layer1..4`` by a :class:`TaskConditionedBlock` (in place)."""
    check_resnet(backbone, "task conditioning")
    for i in range(1, 5):
        layer = getattr(backbone, f"layer{i}")
        for j, block in enumerate(layer):
            layer[j] = TaskConditionedBlock(block, selector, **kwargs)
    return backbone


def check_resnet(backbone: nn.Module, who: str) -> None:
    if not all(hasattr(backbone, f"layer{i}") for i in range(1, 5)) or not hasattr(backbone, "conv1"):
        raise ValueError(f"{who} needs a ResNet backbone (resnet_tiny/resnet_small/resnet18/34/50/101), "
                         f"got {type(backbone).__name__}")


def resnet_stage(backbone: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """Stage ``index`` (0..3) of a ResNet backbone: stage 0 is stem + layer1 (stride 4), then layer2..4."""
    if index == 0:
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    return getattr(backbone, f"layer{index + 1}")(x)
