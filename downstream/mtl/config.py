"""Typed configuration of multi-task finetuning (defaults <- configs/<dataset>/*.yaml <- key=value)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from selfsup.config import ConfigError, check_counts


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
    # training augmentation: scale_crop (flip, a scale from `scales`, random crop to crop_size: NYUD) or
    # scale_rotate_resize (flip, scale ~ U(scale_range), rotation ~ U(±rotation) deg, resize to crop_size: PASCAL)
    augment: str = "scale_crop"
    scales: List[float] = field(default_factory=lambda: [1.0, 1.2, 1.5])
    scale_range: Tuple[float, float] = (0.75, 1.25)
    rotation: float = 20.0
    batch_size: int = 8
    eval_batch_size: int = 8
    num_workers: int = 4
    max_train_images: int = 0  # 0 = all (a subset for quick runs)
    max_val_images: int = 0

    def __post_init__(self) -> None:
        check_counts(self, "data.", positive=("batch_size", "eval_batch_size"),
                     non_negative=("num_workers", "max_train_images", "max_val_images"))
        if self.crop_size is not None and min(self.crop_size) < 1:
            raise ValueError(f"data.crop_size={list(self.crop_size)}: must be > 0")


@dataclass
class ASTMTConfig:
    """Options of ``model.arch=astmt`` (docs/mtl.md)."""
    se: bool = True  # per-task squeeze-and-excitation in the backbone blocks and the decoder
    adapters: bool = True  # per-task residual adapters (1x1 conv beside every 3x3 conv)
    decoder_task_norm: bool = True  # per-task BN in the decoder (the published code, with decoder SE)
    discriminator: bool = True  # task discriminator on the gradients, through a gradient-reversal layer
    discriminator_weight: float = 0.01
    grl_scale: float = 1.0  # gradient-reversal factor
    discriminator_lr_scale: float = 10.0  # discriminator lr relative to the shared layers' (published: 10)
    # lr multipliers for the summed task losses: published = shared x1, task-specific xT, discriminator
    # x discriminator_lr_scale (the published per-task SGD steps); mean = shared x1/T, task-specific x1,
    # discriminator x discriminator_lr_scale/T (the same ratios, T times lower; before)
    lr_scales: str = "published"
    encoder_task_norm: bool = True  # per-task BN in every backbone block (published --trNorm True); false = shared

    def __post_init__(self) -> None:
        if self.lr_scales not in ("published", "mean"):
            raise ConfigError(f"model.astmt.lr_scales={self.lr_scales!r}: expected published or mean")


@dataclass
class FusionConfig:
    """Options of ``model.arch=cross_stitch`` and ``nddr`` (docs/mtl.md)."""
    lr_scale: float = 100.0  # lr of the fusion units (cross-stitch α, NDDR convs + BN) / the rest's (MTLP: 100)
    # published: own task 0.9, every other task 0.1 (MTLP's alpha/beta); split: 0.1 split over the other tasks
    init: str = "published"
    nddr_bn_momentum: float = 0.05  # NDDR units' BN momentum (MTLP, from the NDDR-CNN code); 0.1 = PyTorch's
    nddr_stem: bool = True  # NDDR: also fuse after the stem (5 fusion points, MTLP); false = after the 4 stages

    def __post_init__(self) -> None:
        if self.init not in ("published", "split"):
            raise ConfigError(f"model.fusion.init={self.init!r}: expected published or split")
        if not self.lr_scale > 0 or not 0 < self.nddr_bn_momentum <= 1:
            raise ConfigError(f"model.fusion: lr_scale={self.lr_scale!r} must be > 0 and "
                             f"nddr_bn_momentum={self.nddr_bn_momentum!r} in (0, 1]")


@dataclass
class MTANConfig:
    """Options of ``model.arch=mtan`` (docs/mtl.md)."""
    # the shared block f_s between attention modules: bottleneck = a Bottleneck with C_s/4 planes and C_s outputs
    # (lorenmt/mtan, MTLP); conv = one 3x3 conv-BN-ReLU to C_s/4 (narrower and cheaper; before)
    shared_block: str = "bottleneck"

    def __post_init__(self) -> None:
        if self.shared_block not in ("bottleneck", "conv"):
            raise ConfigError(f"model.mtan.shared_block={self.shared_block!r}: expected bottleneck or conv")


@dataclass
class ModelConfig:
    arch: str = "mti_net"  # single_task | mtl_baseline | pad_net | mti_net | astmt | cross_stitch | nddr | mtan | branched
    backbone: str = "resnet18"
    weights: str = "none"  # backbone weights: our / MoCo / torchvision checkpoint, or 'none' (random init)
    output_stride: int = 32  # 8 or 16 with neck=none + head=aspp (DeepLab)
    neck: str = "fpn"  # fpn | none
    fpn_channels: int = 256
    head: str = "multiscale"  # heads of single_task / mtl_baseline: multiscale | aspp
    head_channels: int = 256
    task_channels: int = 64  # per-task feature channels of PAD-Net / MTI-Net with widths=narrow
    # published: MTI-Net task features = the encoder's channels at each scale, PAD-Net's Bottleneck blocks at
    # head_channels (the published code); narrow: task_channels everywhere (cheap CPU runs)
    widths: str = "published"
    fpm_softmax: str = "task"  # MTI-Net FPM softmax: task (the paper) | published (the code: adjacent channels)
    # MTI-Net FPM non-linear stack width = N*C / fpm_reduction; 0 = the widths' default (published: 1, the paper's
    # f, which its params/FLOPs table measures; narrow: 4); 4 with widths=published = the released code
    fpm_reduction: int = 0
    aspp_rates: List[int] = field(default_factory=lambda: [12, 24, 36])
    num_outputs: Dict[str, int] = field(default_factory=dict)  # override output channels per task
    # branched: one partition of the tasks (main + auxiliary) per branch point, each refining the one above,
    # e.g. [[[semseg, depth]], [[semseg, depth]], [[semseg], [depth]], [[semseg], [depth]]] (downstream/branch.py)
    branching: List[List[List[str]]] = field(default_factory=list)
    branch_points: List[int] = field(default_factory=lambda: [1, 2, 3, 4])  # backbone stages ending the segments
    # bias of the depth prediction layers: "train_mean" (mean valid depth of up to 64 training images),
    # "none" (PyTorch's default init, the output starts near 0 m) or a depth in metres such as "2.5"
    depth_init: str = "train_mean"
    astmt: ASTMTConfig = field(default_factory=ASTMTConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)  # cross_stitch / nddr
    mtan: MTANConfig = field(default_factory=MTANConfig)
    # cross_stitch / nddr: {task: single-task run's checkpoint.pth} to start that task's branch from (fresh runs)
    task_checkpoints: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        depth_init_value(self.depth_init)  # fail at config time on a bad value
        check_counts(self, "model.", positive=("output_stride", "fpn_channels", "head_channels", "task_channels"),
                     non_negative=("fpm_reduction",))


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
    # lr of the backbone's parameters relative to the rest (decoders, heads, necks); 1.0 = one lr for all, as the
    # published multi-task code trains
    backbone_lr_scale: float = 1.0
    loss_weights: Dict[str, float] = field(default_factory=dict)  # override the SPEC defaults per task
    # loss balancer of the main tasks (downstream/mtl/balancers): fixed | uncertainty | gradnorm | dwa | dtp |
    # mgda | mgda_ub | auto_magnitude | pcgrad | cagrad; its parameters by name, e.g. {alpha: 1.5}
    balancer: str = "fixed"
    balancer_args: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optim.optimizer={self.optimizer!r}: expected adam or sgd")


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N epochs (0 = only at the end)
    edge_thresholds: int = 99
    edge_tolerance: float = 0.0075  # × image diagonal
    # images whose edges are evaluated: seism (PASCAL-Context: the SEISM test_new subset of val when the split
    # holds those ids, else all) | all | a file with one id per line
    edge_ids: str = "seism"
    single_task_results: Optional[str] = None  # JSON: single-task runs add their task, MTL runs compute Δ_MTL

    def __post_init__(self) -> None:
        check_counts(self, "eval.", positive=("edge_thresholds",), non_negative=("every", "edge_tolerance"))


# Keys a resumed run may change freely: logging, progress, workers, checkpoint frequency and everything that
# only concerns evaluation. Any other difference from the checkpoint's config is an error on resume unless
# allow_config_change is set (selfsup.rundir).
HARMLESS_KEYS = ("output_dir", "allow_config_change", "log_every", "vis_every", "checkpoint_every",
                 "checkpoint_every_steps", "progress",
                 "compile", "channels_last", "data.num_workers", "data.eval_batch_size", "data.max_val_images",
                 "data.val_split", "eval")


@dataclass
class MTLConfig:
    output_dir: str = "runs/mtl"
    allow_config_change: bool = False  # resume even when keys that change the run differ from the checkpoint's
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
    # also every N optimizer steps inside an epoch (0 = at epoch ends only); resumed bit-exactly mid-epoch. 200:
    # ~3 per PASCAL-Context epoch at the published batch of 8 (4,998 images = 624 steps), ~1 per NYUD epoch (795)
    checkpoint_every_steps: int = 200
    progress: bool = True  # tqdm bars
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_counts(self, "", positive=("epochs", "log_every", "checkpoint_every"),
                     non_negative=("max_iters_per_epoch", "vis_every", "checkpoint_every_steps"))
