"""Pretraining view generation: multi-crop box sampling, the CPU (torchvision/PIL) and the batched
GPU augmentation paths, and the resumable pretraining loader. See docs/augmentation.md."""
from .config import AugmentConfig
from .cpu import MultiViewTransform
from .crops import overlap_fraction, sample_box, sample_constrained_box, sample_multicrop_boxes
from .gpu import GpuMultiViewAugment
from .loader import PretrainLoader, build_pretrain_loader, list_images
from .params import ViewParams, collate_params, sample_view_params

__all__ = [
    "AugmentConfig", "MultiViewTransform", "GpuMultiViewAugment", "PretrainLoader", "build_pretrain_loader",
    "list_images", "ViewParams", "collate_params", "sample_view_params", "sample_box", "sample_constrained_box",
    "sample_multicrop_boxes", "overlap_fraction",
]
