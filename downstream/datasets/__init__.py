"""The multi-task dense datasets of the transfer benchmarks (PASCAL-Context, NYUD-v2), their base class and
the joint multi-task transforms. Importing this package registers ``pascal_context`` and ``nyud`` in
``selfsup.data.DATASETS``."""
from .multitask import MultiTaskDataset, save_dataset_preview
from .nyud import NYUDMT
from .pascal_context import PascalContextMT

__all__ = ["MultiTaskDataset", "NYUDMT", "PascalContextMT", "save_dataset_preview"]
