"""Per-sample view parameters: a pure function of (seed, epoch, index, image size).

Both augmentation paths consume the same parameters: the CPU path applies them to PIL images one
sample at a time, the GPU path in batches. This is what makes a view identical whatever the worker,
and what makes the two paths draw from the same distributions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .config import AugmentConfig
from .crops import Box, sample_multicrop_boxes
from .policy import IMAGENET_POLICY, OP_ID, magnitude


@dataclass
class ViewParams:
    box: Box  # top, left, height, width in original-image pixels
    flip: bool
    auto_augment: bool  # True: HFlip -> AutoAugment branch; False: standard MoCo-v2 pipeline
    jitter: bool
    factors: Tuple[float, float, float, float]  # brightness, contrast, saturation (x), hue shift
    order: Tuple[int, int, int, int]  # jitter op order, 0..3 = brightness, contrast, saturation, hue
    grayscale: bool
    blur: bool
    sigma: float
    ops: Tuple[Tuple[str, float], ...]  # AutoAugment ops actually applied: (name, magnitude)
    constraint_met: bool = True


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def _view_params(rng: np.random.Generator, cfg: AugmentConfig, box: Box, met: bool, may_auto_augment: bool,
                 size: int) -> ViewParams:
    # every view draws the same number of values in the same order, whatever the branch
    aa = may_auto_augment and cfg.auto_augment and rng.random() < cfg.auto_augment_p
    flip = rng.random() < cfg.flip_p
    b, c, s, h = cfg.jitter
    factors = (rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
               rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h))
    order = tuple(int(o) for o in rng.permutation(4))
    jitter = rng.random() < cfg.jitter_p
    gray = rng.random() < cfg.grayscale_p
    blur = rng.random() < cfg.blur_p
    sigma = rng.uniform(*cfg.blur_sigma)
    sub_policy = IMAGENET_POLICY[int(rng.integers(len(IMAGENET_POLICY)))]
    apply_draws, sign_draws = rng.random(2), rng.random(2)
    ops = ()
    if aa:  # torchvision's AutoAugment: each op of the sub-policy applies with its own probability
        ops = tuple((name, magnitude(name, bin_, -1.0 if sgn < 0.5 else 1.0, size, size))
                    for (name, p, bin_), u, sgn in zip(sub_policy, apply_draws, sign_draws) if u < p)
    return ViewParams(box=box, flip=bool(flip), auto_augment=bool(aa), jitter=bool(jitter and not aa),
                      factors=tuple(float(f) for f in factors), order=order, grayscale=bool(gray and not aa),
                      blur=bool(blur and not aa), sigma=float(sigma), ops=ops, constraint_met=met)


def sample_view_params(cfg: AugmentConfig, seed: int, epoch: int, index: int, height: int, width: int
                       ) -> List[ViewParams]:
    """All views of one image: [query, key, small_1..small_N]. The key never takes AutoAugment."""
    rng = sample_rng(seed, epoch, index)
    boxes, met = sample_multicrop_boxes(rng, height, width, cfg)
    return [_view_params(rng, cfg, box, ok, may_auto_augment=(v != 1), size=cfg.view_size(v))
            for v, (box, ok) in enumerate(zip(boxes, met))]


MAX_AA_OPS = 2


def collate_params(batch: Sequence[Sequence[ViewParams]]) -> Dict[str, torch.Tensor]:
    """Stack the parameters of B samples x V views into tensors of shape [B, V, ...] for the GPU path."""
    def stack(fn, dtype):
        return torch.tensor([[fn(p) for p in views] for views in batch], dtype=dtype)

    return {
        "flip": stack(lambda p: p.flip, torch.bool),
        "auto_augment": stack(lambda p: p.auto_augment, torch.bool),
        "jitter": stack(lambda p: p.jitter, torch.bool),
        "factors": stack(lambda p: p.factors, torch.float32),
        "order": stack(lambda p: p.order, torch.long),
        "grayscale": stack(lambda p: p.grayscale, torch.bool),
        "blur": stack(lambda p: p.blur, torch.bool),
        "sigma": stack(lambda p: p.sigma, torch.float32),
        # op ids (0 = identity) and magnitudes of the applied AutoAugment ops: [B, V, 2]
        "op_id": stack(lambda p: [OP_ID[p.ops[k][0]] if k < len(p.ops) else 0 for k in range(MAX_AA_OPS)],
                       torch.long),
        "op_mag": stack(lambda p: [p.ops[k][1] if k < len(p.ops) else 0.0 for k in range(MAX_AA_OPS)],
                        torch.float32),
    }
