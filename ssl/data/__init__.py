"""Datasets: readers of the real on-disk formats, joint multi-task transforms, and the embedded
synthetic data generator that writes those formats (see docs/data.md)."""
from .catalog import DATASETS, EMBEDDED, build_dataset, env_var, resolve_data_root
from .davis import DAVIS2017
from .images import ClassificationFolder, CocoImages, ImageFolder, list_images, load_rgb
from .nyud import NYUDMT
from .pascal_context import PascalContextMT
from .synthetic import FORMATS, ensure_embedded_data, generate_datasets
from .voc import VOC07Classification, VOC2012Segmentation

__all__ = [
    "DATASETS", "EMBEDDED", "build_dataset", "env_var", "resolve_data_root", "DAVIS2017",
    "ClassificationFolder", "CocoImages", "ImageFolder", "list_images", "load_rgb", "NYUDMT",
    "PascalContextMT", "FORMATS", "ensure_embedded_data", "generate_datasets", "VOC2012Segmentation", "VOC07Classification",
    "save_sample_grid",
]


def save_sample_grid(*args, **kwargs):
    """See :func:`selfsup.data.preview.save_sample_grid` (imported lazily)."""
    from .preview import save_sample_grid as _save

    return _save(*args, **kwargs)
