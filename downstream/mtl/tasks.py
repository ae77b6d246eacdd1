"""The task record: one :class:`Task` per dense task holds every per-task fact, and the models (head channels),
the losses, the meters, the post-processing, the data (label tensors), the figures and Δ_MTL read it.

Two datasets share the task names of the multi-task benchmarks (PASCAL-Context MT and NYUD-v2); the names equal
the sample keys the datasets return ('semseg', 'human_parts', 'sal', 'normals', 'edge', 'depth'). A new task is
one more entry in ``TASKS``.

Label kinds (the conventions of the labels as the datasets return them, see docs/data.md):
  ``classes``  int64 [H,W] class ids, ``ignore_index`` 255 = ignore; predictions: argmax class ids
  ``binary``   float32 [1,H,W] in {0,1}, 255 = ignore; predictions: sigmoid probabilities
  ``normals``  float32 [3,H,W] unit vectors, all-zero = invalid; predictions: L2-normalised vectors
  ``depth``    float32 [1,H,W] metres, 0 = invalid; predictions: clamped at 0
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch.nn import functional as F

from selfsup.data.labels import IGNORE_INDEX

from .edge_metric import EdgeMeter
from .losses import balanced_bce, cross_entropy, depth_l1, normals_l1
from .metrics import DepthMeter, NormalsMeter, SaliencyMeter, SegmentationMeter

LABEL_KINDS = ("classes", "binary", "normals", "depth")
POSTPROCESS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {  # raw output [B,c,H,W] -> what meters take
    "classes": lambda out: out.argmax(dim=1),
    "binary": torch.sigmoid,
    "normals": lambda out: F.normalize(out, dim=1),
    "depth": lambda out: out.clamp(min=0),
}


@dataclass(frozen=True)
class Task:
    """Every fact of one dense task.

    ``outputs`` and ``loss_weight`` are per dataset (the datasets that define the task); ``meter(num_outputs=,
    edge_thresholds=, edge_tolerance=)`` builds the task's meter; ``metric`` is the key of its result that ranks
    it (Δ_MTL, the benchmarks' tables) and ``lower_is_better`` that metric's direction (l_t = 1 in Δ_MTL).
    """

    name: str
    kind: str  # one of LABEL_KINDS: label format, post-processing and figure rendering
    outputs: Mapping[str, int]  # prediction-layer channels, per dataset
    loss_weight: Mapping[str, float]  # default fixed loss weight, per dataset (SPEC §2 table)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (prediction at label size, label) -> scalar
    meter: Callable[..., Any]
    metric: str
    lower_is_better: bool
    ignore_index: Optional[int] = None  # label value that is ignored by loss and meter (None: see `invalid`)
    invalid: str = ""  # how an invalid pixel is marked when there is no ignore index
    labels: str = field(default="")  # what the label values mean

    def __post_init__(self) -> None:
        if self.kind not in LABEL_KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {', '.join(LABEL_KINDS)}")
        if set(self.outputs) != set(self.loss_weight):
            raise ValueError(f"task {self.name!r}: outputs and loss_weight name different datasets")

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Raw network output [B,c,H,W] -> what the meter takes (class ids, probabilities, unit normals, metres)."""
        return POSTPROCESS[self.kind](output.float())


def _segmentation_meter(*, num_outputs: int, **_: Any) -> SegmentationMeter:
    return SegmentationMeter(num_outputs)


def _edge_meter(*, edge_thresholds: int = 99, edge_tolerance: float = 0.0075, **_: Any) -> EdgeMeter:
    return EdgeMeter(num_thresholds=edge_thresholds, tolerance=edge_tolerance)


TASKS: Dict[str, Task] = {t.name: t for t in (
    Task("semseg", "classes", outputs={"nyud": 40, "pascal_context": 21},
         loss_weight={"nyud": 1.0, "pascal_context": 1.0}, loss=cross_entropy, meter=_segmentation_meter,
         metric="miou", lower_is_better=False, ignore_index=IGNORE_INDEX,
         labels="class ids (PASCAL: 0 background + 20 VOC classes; NYUD: 40 classes, PNG 0 -> ignore, v -> v-1)"),
    Task("human_parts", "classes", outputs={"pascal_context": 7}, loss_weight={"pascal_context": 2.0},
         loss=cross_entropy, meter=_segmentation_meter, metric="miou", lower_is_better=False,
         ignore_index=IGNORE_INDEX, labels="0 background + 6 part groups; all ignore in an image without a person"),
    Task("sal", "binary", outputs={"pascal_context": 1}, loss_weight={"pascal_context": 5.0},
         loss=lambda p, t: balanced_bce(p, t, pos_weight=None), meter=lambda **_: SaliencyMeter(), metric="maxf",
         lower_is_better=False, ignore_index=IGNORE_INDEX, labels="1 salient, 0 not (class-balanced BCE)"),
    Task("normals", "normals", outputs={"nyud": 3, "pascal_context": 3},
         loss_weight={"nyud": 10.0, "pascal_context": 10.0}, loss=normals_l1, meter=lambda **_: NormalsMeter(),
         metric="mean", lower_is_better=True, invalid="all-zero vector", labels="unit vectors, camera frame"),
    Task("edge", "binary", outputs={"nyud": 1, "pascal_context": 1}, loss_weight={"nyud": 50.0, "pascal_context": 50.0},
         loss=lambda p, t: balanced_bce(p, t, pos_weight=0.95), meter=_edge_meter, metric="odsf",
         lower_is_better=False, ignore_index=IGNORE_INDEX, labels="1 boundary pixel, 0 not (BCE, positives x0.95)"),
    Task("depth", "depth", outputs={"nyud": 1}, loss_weight={"nyud": 1.0}, loss=depth_l1,
         meter=lambda **_: DepthMeter(), metric="rmse", lower_is_better=True, invalid="0 m", labels="metres"),
)}
ALL_TASKS = tuple(TASKS)
DATASETS = ("nyud", "pascal_context")

# read-only views of the record, by dataset or by task
NUM_OUTPUTS: Dict[str, Dict[str, int]] = {d: {t.name: t.outputs[d] for t in TASKS.values() if d in t.outputs}
                                          for d in DATASETS}
LOSS_WEIGHTS: Dict[str, Dict[str, float]] = {d: {t.name: t.loss_weight[d] for t in TASKS.values() if d in t.loss_weight}
                                             for d in DATASETS}
MAIN_METRIC: Dict[str, str] = {t.name: t.metric for t in TASKS.values()}
LOWER_IS_BETTER: Dict[str, bool] = {t.name: t.lower_is_better for t in TASKS.values()}


def task_record(name: str, *, what: str = "task") -> Task:
    """The record of task ``name``; a KeyError naming the known tasks otherwise."""
    if name not in TASKS:
        raise KeyError(f"no {what} for task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


@dataclass(frozen=True)
class TaskSet:
    """Main tasks (evaluated, final predictions) and auxiliary tasks (only supervise intermediate predictions)."""

    dataset: str
    main: tuple
    auxiliary: tuple = ()
    outputs: Optional[Mapping[str, int]] = None  # overrides the record's outputs[dataset]

    def __post_init__(self) -> None:
        if self.dataset not in NUM_OUTPUTS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {', '.join(NUM_OUTPUTS)}")
        known = NUM_OUTPUTS[self.dataset]
        if not self.main:
            raise ValueError("at least one main task is needed")
        for task in (*self.main, *self.auxiliary):
            if task not in known:
                raise ValueError(f"task {task!r} is not defined for {self.dataset}; tasks: {', '.join(known)}")
        overlap = set(self.main) & set(self.auxiliary)
        if overlap:
            raise ValueError(f"tasks {sorted(overlap)} are listed as main and auxiliary")

    @property
    def all(self) -> tuple:
        return (*self.main, *self.auxiliary)

    def num_outputs(self, task: str) -> int:
        if self.outputs and task in self.outputs:
            return int(self.outputs[task])
        return TASKS[task].outputs[self.dataset]

    def channels(self) -> Dict[str, int]:
        return {t: self.num_outputs(t) for t in self.all}


def loss_weights(dataset: str, tasks: Sequence[str], overrides: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """Default per-task weights for ``dataset`` (the record's ``loss_weight``), with ``overrides`` applied."""
    weights = {t: TASKS[t].loss_weight[dataset] for t in tasks}
    for task, w in (overrides or {}).items():
        if task not in weights:
            raise ValueError(f"loss weight given for {task!r}, which is not among the tasks {list(tasks)}")
        weights[task] = float(w)
    return weights
