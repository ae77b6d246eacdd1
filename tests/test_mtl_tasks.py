"""The task record (downstream/mtl/tasks.py) is the one source of per-task facts: every registered task's loss,
post-processing, meter and metric fit together, on the datasets that define it."""
import pytest
import torch

from downstream.mtl.bench import synthetic_batch
from downstream.mtl.delta import delta_mtl
from downstream.mtl.losses import task_loss
from downstream.mtl.metrics import build_meter, postprocess
from downstream.mtl.tasks import LABEL_KINDS, TASKS, TaskSet, loss_weights
from downstream.mtl.visualize import render_map

CASES = [(name, dataset) for name, task in TASKS.items() for dataset in sorted(task.outputs)]


@pytest.mark.parametrize("name,dataset", CASES)
def test_every_task_record_trains_and_measures(name, dataset):
    task = TASKS[name]
    assert task.kind in LABEL_KINDS and task.outputs[dataset] >= 1
    tasks = TaskSet(dataset, (name,))
    assert tasks.num_outputs(name) == task.outputs[dataset]
    assert loss_weights(dataset, [name]) == {name: task.loss_weight[dataset]}
    _, targets = synthetic_batch(tasks, 2, (16, 16), torch.device("cpu"))
    logits = torch.randn(2, task.outputs[dataset], 8, 8, requires_grad=True)  # half size: task_loss resizes
    loss = task_loss(name, logits, targets[name])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    pred = postprocess(name, torch.randn(2, task.outputs[dataset], 16, 16))
    meter = build_meter(name, num_outputs=task.outputs[dataset], edge_thresholds=5)
    for i in range(2):
        meter.update(pred[i], targets[name][i])
    result = meter.compute()
    assert task.metric in result and result[task.metric] == result[task.metric]  # the ranking metric, not NaN
    assert render_map(name, targets[name][0]).shape == (16, 16, 3)


def test_the_record_decides_the_direction_of_delta_mtl():
    single = {"semseg": {"miou": 50.0}, "depth": {"rmse": 1.0}}
    better = {"semseg": {"miou": 55.0}, "depth": {"rmse": 0.9}}  # +10 % mIoU, -10 % rmse: both better
    assert delta_mtl(better, single, ["semseg", "depth"]) == pytest.approx(10.0)
    assert TASKS["depth"].lower_is_better and not TASKS["semseg"].lower_is_better


def test_unknown_task_names_the_known_ones():
    with pytest.raises(KeyError, match="no loss for task 'sem'; known: semseg, human_parts"):
        task_loss("sem", torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(KeyError, match="no metric for task 'sem'"):
        build_meter("sem", num_outputs=2)
