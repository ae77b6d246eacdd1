"""kNN positives loss of the improved recipe: known answer, mining, gradients, queue alignment, warm-up."""
import math

import pytest
import torch
from torch.nn import functional as F

from conftest import TINY_PRETRAIN
from selfsup.config import load_config
from selfsup.moco.config import PretrainConfig
from selfsup.moco.contrastive import knn_positives_loss, mine_neighbours
from selfsup.moco.model import MoCo
from selfsup.moco.loop import run_pretraining


def test_knn_loss_hand_computed():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    queue = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]]), dim=1)
    neighbours = torch.tensor([[0, 3], [1, 2]])
    tau = 0.2
    expected = 0.0
    for i in range(2):
        logits = [float(q[i] @ n) / tau for n in queue]
        log_z = math.log(sum(math.exp(v) for v in logits))
        expected += sum(logits[j] - log_z for j in neighbours[i].tolist()) / 2
    loss = knn_positives_loss(q, queue, neighbours, temperature=tau)
    assert loss.item() == pytest.approx(-expected / 2, rel=1e-5)


def test_mining_uses_backbone_similarity():
    feats = F.normalize(torch.tensor([[1.0, 0.1, 0.0]]), dim=1)
    bq = F.normalize(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.9, 0.3, 0.0], [-1.0, 0.0, 0.0]]), dim=1)
    assert mine_neighbours(feats, bq, 2).tolist() == [[1, 2]]


def test_gradients_reach_only_the_projection_path():
    q = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    g = F.normalize(torch.randn(4, 16), dim=1).requires_grad_()
    queue, bq = F.normalize(torch.randn(10, 8), dim=1), F.normalize(torch.randn(10, 16), dim=1)
    loss = knn_positives_loss(q, queue, mine_neighbours(g, bq, 3), temperature=0.2)
    grad_q, grad_g = torch.autograd.grad(loss, [q, g], allow_unused=True)
    assert grad_q is not None and grad_q.abs().sum() > 0
    assert grad_g is None  # mining is index-only, under no_grad


def test_queues_stay_aligned_after_wrap():
    m = MoCo(arch="resnet_tiny", hidden_dim=16, dim=4, queue_size=6, knn_k=2)
    channels = m.backbone_queue.shape[1]
    for step in range(5):  # 5 x 2 entries through a queue of 6: wraps around
        ids = torch.arange(2 * step, 2 * step + 2, dtype=torch.float32)
        m.enqueue(ids[:, None].expand(2, 4), ids[:, None].expand(2, channels))
    assert torch.equal(m.key_queue[:, 0], m.backbone_queue[:, 0].float())
    assert m.key_queue[:, 0].tolist() == [6, 7, 8, 9, 4, 5]


def test_step_uses_queue_state_before_enqueue():
    torch.manual_seed(0)
    m = MoCo(arch="resnet_tiny", hidden_dim=16, dim=8, queue_size=8, knn_k=2)
    before = (m.key_queue.clone(), m.backbone_queue.clone())
    views = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    out, (keys, gkeys) = m(views, momentum=0.99, use_knn=True, generator=torch.Generator().manual_seed(0))
    # the current batch's keys are not in the queues while its losses are computed
    assert torch.equal(m.key_queue, before[0]) and torch.equal(m.backbone_queue, before[1])
    assert "loss_nn" in out and torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(out["loss_inst"].item() + 0.4 * out["loss_nn"].item(), rel=1e-5)
    m.enqueue(keys, gkeys)
    assert torch.equal(m.key_queue[:4], keys)


def test_warmup_switches_knn_loss_on_at_the_right_epoch(tmp_path, embedded_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = load_config(PretrainConfig, overrides=TINY_PRETRAIN + [
        f"output_dir={tmp_path}", "data.knn_monitor=none", "train.epochs=2", "train.steps_per_epoch=3",
        "moco.knn_k=5", "moco.knn_warmup_epochs=1"])
    run_pretraining(cfg)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss_nn")]
    assert steps == [4, 5, 6]  # global steps of epoch 1 only (steps are counted from 1 in the log)
