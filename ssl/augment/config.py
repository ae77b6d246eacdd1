"""Typed configuration of the pretraining view generation (a sub-section of the pretraining config)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Tuple

from selfsup.config import check_counts

CONSTRAINTS = ("overlap", "inside", "none")
DECODERS = ("cpu", "gpu")


@dataclass
class AugmentConfig:
    """View-generation recipe. Defaults = the improved recipe of the published COCO runs (SPEC §1).

    ``AugmentConfig.preset("moco")`` gives the MoCo-v2 baseline (2 x 224, no small crops, no AutoAugment).
    """

    large_size: int = 160
    large_scale: Tuple[float, float] = (0.2, 1.0)
    num_small: int = 4
    small_size: int = 96
    small_scale: Tuple[float, float] = (0.05, 0.14)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    # constrained multi-crop: "overlap" (published code), "inside" (thesis), "none"
    constraint: str = "overlap"
    min_overlap: float = 0.1  # fraction of the small crop's area that must lie in the key box
    constraint_tries: int = 10
    # Standard-or-AutoAugment: query and small crops take "HFlip -> AutoAugment" with this probability
    auto_augment: bool = True
    auto_augment_p: float = 0.5
    # standard MoCo-v2 colour pipeline
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    # where JPEGs are decoded on the GPU path: "cpu" (workers, PIL draft) or "gpu" (nvjpeg)
    decode: str = "cpu"

    def __post_init__(self) -> None:
        self.large_scale, self.small_scale, self.ratio = tuple(self.large_scale), tuple(self.small_scale), tuple(self.ratio)
        self.jitter, self.blur_sigma = tuple(self.jitter), tuple(self.blur_sigma)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"unknown constraint {self.constraint!r}; known: {', '.join(CONSTRAINTS)}")
        if self.decode not in DECODERS:
            raise ValueError(f"unknown decode {self.decode!r}; known: {', '.join(DECODERS)}")
        check_counts(self, "augment.", positive=("large_size", "small_size", "constraint_tries"),
                     non_negative=("num_small",))

    @property
    def num_views(self) -> int:
        return 2 + self.num_small

    def view_size(self, view: int) -> int:
        return self.large_size if view < 2 else self.small_size

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "AugmentConfig":
        """``"moco"`` (MoCo-v2 baseline) or ``"ours"`` / ``"multicrop"`` (improved recipe), plus overrides."""
        if name not in PRESETS:
            raise KeyError(f"unknown augmentation preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return replace(cls(**PRESETS[name]), **overrides)


PRESETS = {
    "moco": dict(large_size=224, num_small=0, auto_augment=False),
    "multicrop": dict(auto_augment=False),
    "ours": dict(),
}
