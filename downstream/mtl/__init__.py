"""Multi-task dense prediction: single-task baselines, MTL baseline, PAD-Net, MTI-Net; losses, metrics, Δ_MTL.

Entry points: ``downstream/finetune_mtl.py`` (training + evaluation) and ``downstream/bench_mtl.py`` (throughput).
"""
from .delta import delta_mtl
from .losses import MultiTaskLoss, task_loss
from .models import architecture_names, build_model
from .tasks import TaskSet, loss_weights

__all__ = ["MultiTaskLoss", "TaskSet", "architecture_names", "build_model", "delta_mtl", "loss_weights", "task_loss"]
