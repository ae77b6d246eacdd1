"""Linear probe on frozen, pooled backbone features (MoCo protocol's classifier and schedule).

The backbone is frozen in eval mode (BN statistics frozen); L2-normalised pooled features of the centre
crops (as in the VOC07 protocol; this keeps lr 30 stable for any backbone, random init included) are
extracted once and a linear layer is trained on them with SGD (lr 30, momentum 0.9, no weight decay, lr x0.1 at
60% and 80% of the epochs). Training on cached centre-crop features (no RandomResizedCrop per epoch)
is the fast variant used for small sets and CPU runs.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn
from torch.nn import functional as F

Features = Tuple[torch.Tensor, torch.Tensor]


def train_linear_probe(train: Features, val: Features, *, num_classes: int, epochs: int = 100, lr: float = 30.0,
                       batch_size: int = 256, seed: int = 0) -> Dict[str, float]:
    """Top-1 accuracy (%) of a linear classifier trained on ``train`` = (features [N, C], labels [N])."""
    generator = torch.Generator().manual_seed(seed)
    x, y = train
    classifier = nn.Linear(x.shape[1], num_classes)
    nn.init.normal_(classifier.weight, std=0.01, generator=generator)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    milestones = [int(epochs * 0.6), int(epochs * 0.8)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(classifier(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    with torch.no_grad():
        train_acc = (classifier(x).argmax(1) == y).float().mean().item() * 100
        val_acc = (classifier(val[0]).argmax(1) == val[1]).float().mean().item() * 100
    return {"train_top1": train_acc, "val_top1": val_acc}
