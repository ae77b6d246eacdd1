"""kNN classification of frozen features: cosine top-k, votes weighted exp(sim / T) (k = 20, T = 0.07)."""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def eval_transform(size: int, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   resize: Optional[int] = None) -> T.Compose:
    """Resize(resize or size) + CenterCrop(size) + ImageNet normalisation (the probes' evaluation transform)."""
    return T.Compose([T.Resize(resize or size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


def labelled_loaders(name: str, root: Optional[str], *, size: int, workers: int = 2,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     splits: Sequence[str] = ("train", "val"), resize: Optional[int] = None
                     ) -> Tuple[List[DataLoader], int]:
    """Loaders of ``splits`` of a labelled dataset with Resize + CenterCrop(size), and its class count
    (class folders: ``len(classes)``; multi-label sets: the width of ``labels``)."""
    from selfsup.data import build_dataset

    transform = eval_transform(size, mean=mean, std=std, resize=resize)
    sets = [build_dataset(name, root=root, split=split, transform=transform) for split in splits]
    num_classes = len(sets[0].classes) if hasattr(sets[0], "classes") else sets[0].labels.shape[1]
    return [DataLoader(ds, batch_size=256, num_workers=workers) for ds in sets], num_classes


@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *,
                     device: torch.device, normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pooled features [N, C] (L2-normalised unless ``normalize=False``) and labels [N] (model in eval mode)."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, targets in batches:
        out = model(images.to(device, non_blocking=True)).float()
        feats.append((F.normalize(out, dim=1) if normalize else out).cpu())
        labels.append(torch.as_tensor(targets))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, *,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted labels [M] for normalised ``test_features`` [M, C] against [N, C] train features."""
    k = min(k, train_features.shape[0])
    preds = []
    for start in range(0, test_features.shape[0], chunk):
        sim = test_features[start:start + chunk] @ train_features.t()  # [m, N] cosine
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor], *,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    pred = knn_classify(train[0], train[1], test[0], num_classes=num_classes, k=k, temperature=temperature)
    return (pred == test[1]).float().mean().item() * 100.0
