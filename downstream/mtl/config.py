"""Typed configuration of multi-task finetuning (defaults <- configs/<dataset>/*.yaml <- key=value)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass
class DataConfig:
    dataset: str = "nyud"  # nyud | pascal_context
    root: str = "embedded"  # a folder in the dataset's layout, or 'embedded' (generated synthetic data)
    tasks: List[str] = field(default_factory=lambda: ["semseg", "depth"])  # main tasks: evaluated
    auxiliary_tasks: List[str] = field(default_factory=list)  # supervised (initial predictions), not evaluated
    train_split: str = "train"
    val_split: str = "val"
    # training crop (H, W): NYUD 480x640, PASCAL 512x512; null = the size of the first training image
    crop_size: Optional[Tuple[int, int]] = None
    scales: List[float] = field(default_factory=lambda: [1.0, 1.2, 1.5])
    batch_size: int = 8
    eval_batch_size: int = 8
    num_workers: int = 4
    max_train_images: int = 0  # 0 = all (a subset for quick runs)
    max_val_images: int = 0


@dataclass
class ModelConfig:
    arch: str = "mti_net"  # single_task | mtl_baseline | pad_net | mti_net | branched
    backbone: str = "resnet18"
    weights: str = "none"  # backbone weights: our / MoCo / torchvision checkpoint, or 'none' (random init)
    output_stride: int = 32  # 8 or 16 with neck=none + head=aspp (DeepLab)
    neck: str = "fpn"  # fpn | none
    fpn_channels: int = 256
    head: str = "multiscale"  # heads of single_task / mtl_baseline: multiscale | aspp
    head_channels: int = 256
    task_channels: int = 64  # per-task feature channels of PAD-Net / MTI-Net
    aspp_rates: List[int] = field(default_factory=lambda: [12, 24, 36])
    num_outputs: Dict[str, int] = field(default_factory=dict)  # override output channels per task
    # branched: one partition of the tasks (main + auxiliary) per branch point, each refining the one above,
    # e.g. [[[semseg, depth]], [[semseg, depth]], [[semseg], [depth]], [[semseg], [depth]]] (downstream/branch.py)
    branching: List[List[List[str]]] = field(default_factory=list)
    branch_points: List[int] = field(default_factory=lambda: [1, 2, 3, 4])  # backbone stages ending the segments
    # bias of the depth prediction layers: "train_mean" (mean valid depth of up to 64 training images),
    # "none" (PyTorch's default init, the output starts near 0 m) or a depth in metres such as "2.5"
    depth_init: str = "train_mean"

    def __post_init__(self) -> None:
        depth_init_value(self.depth_init)  # fail at config time on a bad value


def depth_init_value(depth_init: str) -> Optional[float]:
    """``model.depth_init`` as metres; None for "train_mean" and "none" (resolved by the caller)."""
    if depth_init in ("train_mean", "none"):
        return None
    try:
        return float(depth_init)
    except ValueError:
        raise ValueError(f"model.depth_init={depth_init!r}: expected 'train_mean', 'none' or a depth in metres") from None


@dataclass
class OptimConfig:
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    poly_power: float = 0.9
    loss_weights: Dict[str, float] = field(default_factory=dict)  # override the SPEC defaults per task


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N epochs (0 = only at the end)
    edge_thresholds: int = 99
    edge_tolerance: float = 0.0075  # × image diagonal
    single_task_results: Optional[str] = None  # JSON: single-task runs add their task, MTL runs compute Δ_MTL


@dataclass
class MTLConfig:
    output_dir: str = "runs/mtl"
    seed: int = 0
    epochs: int = 100
    max_iters_per_epoch: int = 0  # 0 = the whole train set
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA (always fp32 on CPU)
    channels_last: bool = True  # on CUDA
    compile: bool = False
    log_every: int = 20
    vis_every: int = 1  # prediction grids to TensorBoard every N epochs (0 = never)
    checkpoint_every: int = 1  # epochs
    progress: bool = True  # tqdm bars
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
