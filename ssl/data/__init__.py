"""Generic data of the pretraining package: the dataset registry and root resolution, image-folder readers,
label I/O, and the embedded synthetic data generator that writes every format (see docs/data.md).

The readers of the evaluation and transfer formats live above this package and register into the same
``DATASETS`` when imported: DAVIS-2017 and VOC in ``frozen.davis`` / ``frozen.voc``, NYUD-v2 and
PASCAL-Context (with the joint multi-task transforms) in ``downstream.datasets``.
"""
from .catalog import DATASETS, EMBEDDED, build_dataset, env_var, register_layout, resolve_data_root
from .images import ClassificationFolder, CocoImages, ImageFolder, list_images, load_rgb, read_split
from .synthetic import FORMATS, ensure_embedded_data, generate_datasets

__all__ = [
    "DATASETS", "EMBEDDED", "build_dataset", "env_var", "register_layout", "resolve_data_root",
    "ClassificationFolder", "CocoImages", "ImageFolder", "list_images", "load_rgb", "read_split",
    "FORMATS", "ensure_embedded_data", "generate_datasets", "save_sample_grid",
]


def save_sample_grid(*args, **kwargs):
    """See :func:`selfsup.data.preview.save_sample_grid` (imported lazily)."""
    from .preview import save_sample_grid as _save

    return _save(*args, **kwargs)
