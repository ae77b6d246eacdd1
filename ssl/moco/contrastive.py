"""MoCo losses as pure functions of tensors (no communication, no queue updates).

Shapes: N query rows (B large-crop queries + B*n small-crop queries), K queue entries,
D projection dim (128), C backbone dim (2048 for ResNet-50).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch.nn import functional as F


def queue_logits(q: torch.Tensor, key_queue: torch.Tensor) -> torch.Tensor:
    """``l_neg = q · Q_h`` [N, K] in fp32, also under autocast (which would run it in bf16)."""
    with torch.autocast(q.device.type, enabled=False):
        return q.float() @ key_queue.float().t()


def instance_loss(q: torch.Tensor, k: torch.Tensor, key_queue: torch.Tensor, *, temperature: float,
                  l_neg: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """InfoNCE over ``[l_pos, l_neg] / τ`` with label 0.

    q: [N, D] normalised queries; k: [N, D] the positive key of each row; key_queue: [K, D] negatives;
    ``l_neg``: ``queue_logits(q, key_queue)`` when the caller already has it.
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
    l_neg = queue_logits(q, key_queue) if l_neg is None else l_neg  # [N, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits.float(), labels)
    stats = {"logit_pos": l_pos.detach().mean(), "logit_neg": l_neg.detach().mean(),
             "acc_top1": (logits.detach().argmax(dim=1) == 0).float().mean()}
    return loss, stats


@torch.no_grad()
def mine_neighbours(query_features: torch.Tensor, backbone_queue: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [N, k] of each query's top-k neighbours by cosine similarity of backbone features.

    query_features: [N, C] L2-normalised backbone features of the queries; backbone_queue: [K, C].
    """
    sim = query_features.to(backbone_queue.dtype) @ backbone_queue.t()  # [N, K], no temperature
    return sim.topk(k, dim=1).indices


def knn_positives_loss(q: torch.Tensor, key_queue: torch.Tensor, neighbours: torch.Tensor, *,
                       temperature: float, l_neg: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``-mean_rows( (1/k) Σ_{j ∈ topk} log_softmax(q·Q_h / τ)_j )`` over the K queue entries only.

    The positive key is not in this softmax; gradients reach q only (the mining is index-only).
    ``l_neg``: the instance loss's ``queue_logits(q, key_queue)``, reused instead of recomputed.
    """
    l_neg = queue_logits(q, key_queue) if l_neg is None else l_neg
    log_prob = F.log_softmax(l_neg.float() / temperature, dim=1)  # [N, K]
    return -log_prob.gather(1, neighbours).mean()
