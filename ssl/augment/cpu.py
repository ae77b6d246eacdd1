"""CPU view generation with torchvision/PIL: one sample at a time, for DataLoader workers."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode

from .config import AugmentConfig
from .decode import decode_reduced
from .params import ViewParams, sample_view_params
from .policy import shear_degrees

_NEAREST = InterpolationMode.NEAREST
_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def apply_auto_augment_op(img: Image.Image, name: str, mag: float) -> Image.Image:
    """One AutoAugment op on a PIL image (nearest interpolation, fill 0)."""
    if name == "ShearX":
        return TF.affine(img, 0.0, [0, 0], 1.0, [shear_degrees(mag), 0.0], _NEAREST, center=[0, 0])
    if name == "ShearY":
        return TF.affine(img, 0.0, [0, 0], 1.0, [0.0, shear_degrees(mag)], _NEAREST, center=[0, 0])
    if name == "TranslateX":
        return TF.affine(img, 0.0, [int(mag), 0], 1.0, [0.0, 0.0], _NEAREST)
    if name == "TranslateY":
        return TF.affine(img, 0.0, [0, int(mag)], 1.0, [0.0, 0.0], _NEAREST)
    if name == "Rotate":
        return TF.rotate(img, mag, _NEAREST)
    if name == "Brightness":
        return TF.adjust_brightness(img, 1.0 + mag)
    if name == "Color":
        return TF.adjust_saturation(img, 1.0 + mag)
    if name == "Contrast":
        return TF.adjust_contrast(img, 1.0 + mag)
    if name == "Sharpness":
        return TF.adjust_sharpness(img, 1.0 + mag)
    if name == "Posterize":
        return TF.posterize(img, int(mag))
    if name == "Solarize":
        return TF.solarize(img, mag)
    if name == "AutoContrast":
        return TF.autocontrast(img)
    if name == "Equalize":
        return TF.equalize(img)
    if name == "Invert":
        return TF.invert(img)
    if name == "Identity":
        return img
    raise ValueError(f"unknown AutoAugment op {name!r}")


def apply_view(img: Image.Image, box, size: int, p: ViewParams) -> Image.Image:
    """Crop-resize, then either HFlip -> AutoAugment or the standard MoCo-v2 colour pipeline.

    The flip is applied first in both branches: in the standard pipeline it commutes with jitter,
    grayscale and the (symmetric) blur, so the result equals MoCo-v2's order.
    """
    view = img.resize((size, size), Image.BILINEAR, box=box)  # antialiased, like resized_crop
    if p.flip:
        view = TF.hflip(view)
    if p.auto_augment:
        for name, mag in p.ops:
            view = apply_auto_augment_op(view, name, mag)
        return view
    if p.jitter:
        for k in p.order:
            view = _JITTER[k](view, p.factors[k])
    if p.grayscale:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if p.blur:
        view = view.filter(ImageFilter.GaussianBlur(radius=p.sigma))  # MoCo-v2: PIL blur, radius = sigma
    return view


class MultiViewTransform:
    """``(img, index) -> [query, key, small_1..small_N]`` float tensors, normalised.

    Randomness depends only on ``(seed, epoch, index)``; call ``set_epoch`` every epoch.
    ``debug_hook(index, params)`` (optional) sees the sampled ``ViewParams`` of every sample.
    """

    needs_index = True

    def __init__(self, recipe_cfg: AugmentConfig, seed: int, *,
                 debug_hook: Optional[Callable[[int, List[ViewParams]], None]] = None) -> None:
        self.cfg, self.seed, self.epoch, self.debug_hook = recipe_cfg, int(seed), 0, debug_hook

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, img: Image.Image, index: int, epoch: Optional[int] = None) -> List[torch.Tensor]:
        epoch = self.epoch if epoch is None else epoch
        width, height = img.size
        params = sample_view_params(self.cfg, self.seed, epoch, index, height, width)
        if self.debug_hook is not None:
            self.debug_hook(index, params)
        sizes = [self.cfg.view_size(v) for v in range(len(params))]
        img, boxes = decode_reduced(img, [p.box for p in params], sizes)
        return [TF.normalize(TF.to_tensor(apply_view(img, box, size, p)), self.cfg.mean, self.cfg.std)
                for box, size, p in zip(boxes, sizes, params)]
