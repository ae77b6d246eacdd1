"""Task catalogue: output channels, default loss weights, the metric that ranks a task and its direction.

Two datasets share the task names of the multi-task benchmarks (PASCAL-Context MT and NYUD-v2);
the keys equal the sample keys the datasets return ('semseg', 'human_parts', 'sal', 'normals',
'edge', 'depth').
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

ALL_TASKS = ("semseg", "human_parts", "sal", "normals", "edge", "depth")

# output channels of the prediction layer (semseg differs per dataset)
NUM_OUTPUTS: Dict[str, Dict[str, int]] = {
    "nyud": {"semseg": 40, "normals": 3, "edge": 1, "depth": 1},
    "pascal_context": {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1},
}

# default fixed loss weights (SPEC §2 table); the same weights apply to initial and final predictions
LOSS_WEIGHTS: Dict[str, Dict[str, float]] = {
    "nyud": {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0},
    "pascal_context": {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "edge": 50.0},
}

# metric compared in Δ_MTL, and whether lower is better (l_t = 1)
MAIN_METRIC: Dict[str, str] = {"semseg": "miou", "human_parts": "miou", "sal": "maxf", "normals": "mean",
                               "edge": "odsf", "depth": "rmse"}
LOWER_IS_BETTER: Dict[str, bool] = {"semseg": False, "human_parts": False, "sal": False, "normals": True,
                                    "edge": False, "depth": True}


@dataclass(frozen=True)
class TaskSet:
    """Main tasks (evaluated, final predictions) and auxiliary tasks (only supervise intermediate predictions)."""

    dataset: str
    main: tuple
    auxiliary: tuple = ()
    outputs: Optional[Mapping[str, int]] = None  # overrides NUM_OUTPUTS[dataset]

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
        return NUM_OUTPUTS[self.dataset][task]

    def channels(self) -> Dict[str, int]:
        return {t: self.num_outputs(t) for t in self.all}


def loss_weights(dataset: str, tasks: Sequence[str], overrides: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """Default per-task weights for ``dataset``, with ``overrides`` applied."""
    weights = {t: LOSS_WEIGHTS[dataset][t] for t in tasks}
    for task, w in (overrides or {}).items():
        if task not in weights:
            raise ValueError(f"loss weight given for {task!r}, which is not among the tasks {list(tasks)}")
        weights[task] = float(w)
    return weights
