"""ASTMT: Attentive Single-Tasking of Multiple Tasks (Maninis et al., CVPR 2019).

One network, one forward pass per task selected by a task id. The backbone's blocks and the DeepLab-v3+
decoder are shared; per task they carry squeeze-and-excitation modulation and residual adapters (see
``task_conditioning.py``). A task discriminator reads the gradient of each task's loss with respect to the
shared decoder features (normalised per pixel) through a gradient-reversal layer: the discriminator learns to
tell the tasks apart, the network learns to make their gradients indistinguishable.

Defaults as the published code (``experiments/dense_predict/pascal_resnet/{config,main}.py``): per-task BN in
every backbone block and its shortcut (``--trNorm True``; ``encoder_task_norm=False`` shares it), and lr scales
for the summed loss equivalent to its one SGD step per task pass: shared × 1, task-specific × T, discriminator
× 10 (``lr_scales="published"``); ``lr_scales="mean"`` gives the same ratios T times lower (shared / T,
task-specific × 1, discriminator × 10 / T). See :meth:`ASTMT.param_groups`.

Training runs every task on the batch inside ``forward`` and returns all outputs, so the summed task losses
and one backward give the sum of the per-task gradients. The discriminator needs the task losses: ``forward``
returns ``'extra_losses'`` as a callable that ``MultiTaskLoss`` calls with the weighted task total.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from selfsup.checkpoint import CheckpointMismatchError, backbone_state_dict, load_backbone_weights, state_dict_from_file

from .encoder import Encoder
from .layers import ASPP, PredictionConv, resize
from .components import ARCHITECTURES
from .task_conditioning import (TaskModules, TaskSE, TaskSelector, check_resnet, condition_resnet,
                                expand_task_norm_weights, grad_reverse, task_adapters, task_specific_parameters)


class TaskConvUnit(nn.Module):
    """Shared conv (+ per-task adapter beside a 3x3 conv) -> BN (shared or per task) -> ReLU -> per-task SE."""

    def __init__(self, selector: TaskSelector, in_channels: int, out_channels: int, kernel_size: int, *,
                 se: bool, adapters: bool, task_norm: bool, se_reduction: int = 16) -> None:
        super().__init__()
        self.selector = selector
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.adapters = task_adapters(selector, self.conv) if adapters and kernel_size == 3 else None
        self.bn = (TaskModules({t: nn.BatchNorm2d(out_channels) for t in selector.tasks}) if task_norm
                   else nn.BatchNorm2d(out_channels))
        self.se = TaskSE(selector, out_channels, se_reduction) if se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.adapters is not None:
            out = out + self.adapters[self.selector.current()](x)
        bn = self.bn[self.selector.current()] if isinstance(self.bn, TaskModules) else self.bn
        out = F.relu(bn(out))
        return self.se(out) if self.se is not None else out


class TaskDeepLabV3Plus(nn.Module):
    """DeepLab-v3+ decoder shared by the tasks: ASPP on the last map (then per-task SE), a 1x1 reduction of the
    stride-4 map to 48/256 of the width, concat, two 3x3 units; returns the shared features [B, C, H/4, W/4]."""

    def __init__(self, selector: TaskSelector, *, low_channels: int, high_channels: int, channels: int,
                 rates: Sequence[int], se: bool, adapters: bool, task_norm: bool) -> None:
        super().__init__()
        low = max(8, channels * 48 // 256)
        self.aspp = ASPP(high_channels, channels, rates)
        self.aspp_se = TaskSE(selector, channels) if se else nn.Identity()
        unit = dict(se=se, adapters=adapters, task_norm=task_norm)
        self.low_reduce = TaskConvUnit(selector, low_channels, low, 1, se_reduction=4, **unit)
        self.concat_conv = TaskConvUnit(selector, channels + low, channels, 3, **unit)
        self.process_conv = TaskConvUnit(selector, channels, channels, 3, **unit)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        low = self.low_reduce(low)
        high = resize(self.aspp_se(self.aspp(high)), low.shape[-2:])
        return self.process_conv(self.concat_conv(torch.cat([high, low], dim=1)))


LR_SCALES = ("published", "mean")


class ASTMT(nn.Module):
    def __init__(self, encoder: Encoder, *, tasks: Sequence[str], auxiliary: Sequence[str], channels: Mapping[str, int],
                 decoder_channels: int = 256, aspp_rates: Sequence[int] = (6, 12, 18), se: bool = True,
                 adapters: bool = True, decoder_task_norm: bool = True, discriminator: bool = True,
                 discriminator_weight: float = 0.01, grl_scale: float = 1.0, discriminator_lr_scale: float = 10.0,
                 lr_scales: str = "published", encoder_task_norm: bool = True) -> None:
        super().__init__()
        if lr_scales not in LR_SCALES:
            raise ValueError(f"model.astmt.lr_scales={lr_scales!r}: expected one of {', '.join(LR_SCALES)}")
        self.lr_scales = lr_scales
        self.tasks, self.auxiliary = tuple(tasks), tuple(auxiliary)
        self.all_tasks = (*self.tasks, *self.auxiliary)
        backbone = encoder.backbone
        check_resnet(backbone, "astmt")
        self.selector = TaskSelector(self.all_tasks)
        condition_resnet(backbone, self.selector, se=se, adapters=adapters, task_norm=encoder_task_norm)
        self.encoder = Encoder(backbone)  # the DeepLab-v3+ decoder reads the backbone directly (no neck)
        feat = backbone.feature_channels
        self.decoder = TaskDeepLabV3Plus(self.selector, low_channels=feat[0], high_channels=feat[-1],
                                         channels=decoder_channels, rates=aspp_rates, se=se, adapters=adapters,
                                         task_norm=decoder_task_norm)
        self.predict = TaskModules({t: PredictionConv(decoder_channels, channels[t]) for t in self.all_tasks})
        self.discriminator_weight, self.grl_scale = float(discriminator_weight), float(grl_scale)
        self.discriminator_lr_scale = float(discriminator_lr_scale)
        # fully convolutional task classifier on the normalised gradients (published: 2 layers, 1x1 kernels)
        self.discriminator = (nn.Sequential(nn.Conv2d(decoder_channels, decoder_channels, 1), nn.ReLU(inplace=True),
                                            nn.Conv2d(decoder_channels, len(self.all_tasks), 1))
                              if discriminator and len(self.all_tasks) > 1 else None)

    def forward_task(self, x: torch.Tensor, task: str):
        """One single-tasking pass: (prediction at the input size, shared decoder features)."""
        if task not in self.all_tasks:
            raise KeyError(f"unknown task {task!r}; this model has {list(self.all_tasks)}")
        self.selector.task = task
        try:
            feats = self.encoder(x)
            shared = self.decoder(feats[0], feats[-1])
        finally:
            self.selector.task = None
        return resize(self.predict[task](shared), x.shape[-2:]), shared

    def forward(self, x: torch.Tensor) -> Dict[str, object]:
        preds, shared = {}, {}
        for t in self.all_tasks:
            preds[t], shared[t] = self.forward_task(x, t)
        auxiliary = {t: preds[t] for t in self.auxiliary}
        out: Dict[str, object] = {"final": {t: preds[t] for t in self.tasks}, "initial": [auxiliary] if auxiliary else []}
        if self.discriminator is not None and self.training and torch.is_grad_enabled():
            out["extra_losses"] = partial(self.discriminator_loss, shared)
        return out

    def discriminator_loss(self, shared: Mapping[str, torch.Tensor], task_total: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Σ_t w · CE(D(GRL(g_t / |g_t|)), t), g_t = ∂ task_total / ∂ (task t's shared features), per pixel.

        Task t's features only reach task t's outputs, so the gradient of the weighted total with respect to
        them is task t's own (weighted) loss gradient; the per-pixel normalisation removes the weight.
        """
        names = [t for t in self.all_tasks if shared[t].requires_grad]
        grads = torch.autograd.grad(task_total, [shared[t] for t in names], create_graph=True, allow_unused=True)
        loss = task_total.new_zeros(())
        for t, g in zip(names, grads):
            if g is None:
                continue
            g = g / (g.norm(p=2, dim=1, keepdim=True) + 1e-10)
            logits = self.discriminator(grad_reverse(g, self.grl_scale))  # [B, T, h, w]
            label = torch.full((logits.shape[0], *logits.shape[2:]), self.all_tasks.index(t), device=logits.device)
            loss = loss + F.cross_entropy(logits.float(), label)
        return {"task_discriminator": self.discriminator_weight * loss}

    def param_groups(self) -> List[Dict[str, object]]:
        """lr scales of the shared layers, the task-specific modules (SE, adapters, per-task BN, prediction) and the
        discriminator. ``published``: 1, T, ``discriminator_lr_scale`` (10). The published code steps SGD after
        each task's pass at shared lr, task-specific lr × T, discriminator lr × 10; one step on the summed losses
        at these scales moves every weight as far (to first order). ``mean``: 1/T, 1, ``discriminator_lr_scale``/T."""
        T = len(self.all_tasks)
        shared, own, dscr_scale = ((1.0, float(T), self.discriminator_lr_scale) if self.lr_scales == "published"
                                   else (1.0 / T, 1.0, self.discriminator_lr_scale / T))
        own_ids = {id(p) for ps in task_specific_parameters(self).values() for p in ps}
        dscr = {id(p) for p in self.discriminator.parameters()} if self.discriminator is not None else set()
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in own_ids | dscr], "lr_scale": shared},
                  {"params": [p for p in params if id(p) in own_ids], "lr_scale": own}]
        if dscr:
            groups.append({"params": [p for p in params if id(p) in dscr], "lr_scale": dscr_scale})
        return groups

    def load_backbone_weights(self, source) -> Dict[str, list]:
        """Pretrained backbone weights into the shared layers (its BN into every task's BN when the encoder BN is
        per task); only the task-specific SE/adapters stay as built."""
        backbone = self.encoder.backbone
        weights = backbone_state_dict(state_dict_from_file(source))
        weights = expand_task_norm_weights(weights, list(backbone.state_dict()))
        try:
            result = load_backbone_weights(backbone, weights, strict=False)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(str(err).replace("weights from state_dict", f"weights from {source}")) from None
        extra = [k for k in result["missing"] if ".se." not in k and ".adapters." not in k]
        if extra or result["unexpected"]:
            raise CheckpointMismatchError(f"weights from {source} do not match the ASTMT backbone: missing "
                                          f"{extra[:8]}, unexpected {result['unexpected'][:8]}")
        return result


@ARCHITECTURES.register("astmt")
def astmt(*, encoder: Encoder, tasks: Sequence[str], auxiliary: Sequence[str] = (), channels: Mapping[str, int],
          head_channels: int = 256, aspp_rates: Sequence[int] = (6, 12, 18), astmt_options=None, **_: object) -> ASTMT:
    """ASTMT on a ResNet backbone (``model.output_stride=16`` as published); the decoder is ``head_channels`` wide."""
    o = astmt_options
    kw = {} if o is None else dict(se=o.se, adapters=o.adapters, decoder_task_norm=o.decoder_task_norm,
                                   discriminator=o.discriminator, discriminator_weight=o.discriminator_weight,
                                   grl_scale=o.grl_scale, discriminator_lr_scale=o.discriminator_lr_scale,
                                   lr_scales=o.lr_scales, encoder_task_norm=o.encoder_task_norm)
    return ASTMT(encoder, tasks=tasks, auxiliary=auxiliary, channels=channels, decoder_channels=head_channels,
                 aspp_rates=aspp_rates, **kw)
