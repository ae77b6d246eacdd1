"""Typed schema of a pretraining run (defaults = MoCo-v2 on COCO, SPEC §1) and the CLI flag mapping."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from selfsup.augment.config import AugmentConfig
from selfsup.config import ConfigError, check_counts, nested_updates


@dataclass
class ModelConfig:
    RENAMED_KEYS: ClassVar[Dict[str, str]] = {"arch": "backbone"}  # model.arch: the former name (one release)
    backbone: str = "resnet50"  # the one spelling of every entry point (fine-tuning's model.backbone too)
    hidden_dim: int = 2048  # projection MLP 2048-2048-128
    head_bn: bool = False  # BN after the MLP's hidden layer (SimCLR / MoCo-v3); off in MoCo-v2
    dim: int = 128
    bn: str = "shuffle"  # "shuffle" (shuffle-BN; BN groups in one process) or "sync" (SyncBN)
    shuffle_bn_groups: int = 8  # one-process emulation of 8 GPUs' separate BN statistics
    channels_last: bool = True  # CUDA only
    compile: bool = False

    def __post_init__(self) -> None:
        check_counts(self, "model.", positive=("hidden_dim", "dim", "shuffle_bn_groups"))


@dataclass
class MocoConfig:
    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float = 0.2
    knn_k: int = 0  # 0 = kNN positives off; the improved recipe uses 20
    symmetric: bool = False  # also use the key crop as a query (MoCo-v3's symmetrised loss); 2x key-encoder cost
    knn_weight: float = 0.4
    knn_warmup_epochs: int = -1  # -1 = SPEC default: 5 for runs up to 200 epochs, 20 for longer ones
    backbone_queue_dtype: str = "float32"  # "bfloat16" halves the 2048 x K queue on GPU

    def __post_init__(self) -> None:
        check_counts(self, "moco.", positive=("queue_size", "temperature"),
                     non_negative=("momentum", "knn_k", "knn_weight"))
        if self.knn_warmup_epochs < -1:
            raise ConfigError(f"moco.knn_warmup_epochs={self.knn_warmup_epochs!r}: must be >= 0, or -1 (the SPEC default)")


@dataclass
class DataConfig:
    name: str = "embedded"  # a registered dataset name ("coco", "embedded", ...) or a folder of images
    root: Optional[str] = None
    embedded_num: int = 200  # images per format of the generated embedded data (name "embedded")
    num_workers: int = 8
    gpu_aug: Optional[bool] = None  # None: on when CUDA is available
    knn_monitor: str = "embedded"  # labelled classification set for the online kNN monitor; "none" = off
    knn_monitor_root: Optional[str] = None

    def __post_init__(self) -> None:
        check_counts(self, "data.", positive=("embedded_num",), non_negative=("num_workers",))


OPTIMIZERS = ("sgd", "adamw")


@dataclass
class OptimConfig:
    name: str = "sgd"  # "sgd" (MoCo-v2) or "adamw"
    lr: float = 0.3  # for a global batch of 256; scaled linearly with the global batch
    momentum: float = 0.9  # SGD momentum, or AdamW's beta1
    beta2: float = 0.999  # AdamW only
    weight_decay: float = 1e-4
    batch_size: int = 256  # global, divided over the processes
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r}: expected one of {', '.join(OPTIMIZERS)}")
        check_counts(self, "optim.", positive=("batch_size",), non_negative=("lr", "weight_decay", "warmup_epochs"))


@dataclass
class TrainConfig:
    epochs: int = 200
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    amp: bool = True  # bf16 autocast on CUDA (always fp32 on CPU)
    checkpoint_every_steps: int = 1000
    log_every_steps: int = 20
    nan_check_every: int = 50  # read the NaN/Inf flag back every N steps (and before every checkpoint)
    knn_every_epochs: int = 10  # how often the monitors run
    monitors: List[str] = field(default_factory=lambda: ["knn"])  # knn, davis, retrieval (selfsup.monitors)
    max_steps: int = 0  # stop (checkpointed) after this many global steps; 0 = run all epochs
    steps_per_epoch: int = 0  # cap on steps per epoch (demos); 0 = the whole dataset

    def __post_init__(self) -> None:
        check_counts(self, "train.", positive=("epochs", "checkpoint_every_steps", "log_every_steps", "knn_every_epochs"),
                     non_negative=("max_steps", "steps_per_epoch"))


# Keys a resumed run may change freely (logging, progress, workers, checkpoint/monitor frequency, where to stop):
# they do not change the training trajectory or the model. Any other difference between the new config and
# the checkpoint's is an error on resume unless allow_config_change is set (selfsup.rundir).
HARMLESS_KEYS = ("output_dir", "allow_config_change", "data.num_workers", "data.knn_monitor", "data.knn_monitor_root",
                 "model.channels_last", "model.compile", "train.checkpoint_every_steps", "train.log_every_steps",
                 "train.knn_every_epochs", "train.max_steps")


@dataclass
class PretrainConfig:
    output_dir: str = "runs/pretrain"
    allow_config_change: bool = False  # resume even when keys that change the run differ from the checkpoint's
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig.preset("moco"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def flags_to_updates(args: Any) -> Dict[str, Any]:
    """Map the user-facing flags of ``launch/pretrain.py`` onto config keys (only flags that were given)."""
    flat: Dict[str, Any] = {
        "data.name": args.data, "data.root": args.data_root, "model.backbone": args.backbone, "train.epochs": args.epochs,
        "optim.batch_size": args.batch_size, "optim.lr": args.lr, "output_dir": args.output_dir,
        "data.num_workers": args.workers, "train.seed": args.seed, "augment.constraint": args.crop_constraint,
        "moco.knn_k": args.knn, "moco.knn_weight": args.knn_weight, "moco.knn_warmup_epochs": args.knn_warmup_epochs,
        "allow_config_change": getattr(args, "allow_config_change", None) or None,
    }
    if args.multicrop:
        # published recipe: 2 x 160 + 4 x 96, constrained crops, Standard-or-AutoAugment, m = 0.995
        flat.update({"augment.large_size": 160, "augment.num_small": args.num_small, "augment.auto_augment": True,
                     "moco.momentum": 0.995})
    if args.auto_augment is not None:
        flat["augment.auto_augment"] = args.auto_augment
    return nested_updates(flat)


def knn_warmup_epochs(knn_warmup: int, epochs: int) -> int:
    """Epochs without the kNN loss: ``knn_warmup`` if set (>= 0), else 5 for runs up to 200 epochs and 20 beyond
    (the published 200/800-epoch recipes), whichever way ``train.epochs`` was given (YAML, flag or key=value)."""
    if knn_warmup >= 0:
        return knn_warmup
    return 5 if epochs <= 200 else 20
