"""The MoCo method owner: query/key encoders, the key queue (and backbone queue for kNN positives)."""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from selfsup.backbones import build_backbone
from selfsup.device import upload
from selfsup.distributed import all_gather, get_rank, get_world_size
from selfsup.moco.contrastive import instance_loss, knn_positives_loss, mine_neighbours, queue_logits
from selfsup.moco.shuffle_bn import grouped_batch_norm


class Encoder(nn.Module):
    """Backbone g + projection MLP h: Linear, ReLU, Linear (MoCo-v2), or Linear, BN, ReLU, Linear with
    ``head_bn`` (as SimCLR and MoCo-v3: the BN centres the embeddings, which short runs need, see
    docs/pretraining.md).

    ``forward(views)`` takes a list of image batches; consecutive batches of the same size are
    encoded in one forward. Returns (backbone features [N, C], projections [N, D]), both un-normalised.
    """

    def __init__(self, backbone: nn.Module, *, hidden_dim: int, out_dim: int, head_bn: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        norm = [nn.BatchNorm1d(hidden_dim)] if head_bn else []
        self.head = nn.Sequential(nn.Linear(backbone.num_features, hidden_dim), *norm, nn.ReLU(inplace=True),
                                  nn.Linear(hidden_dim, out_dim))

    def forward(self, views: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        feats = []
        start = 0
        while start < len(views):  # group same-resolution crops: one forward per size
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(list(views[start:end]))))
            start = end
        g = torch.cat(feats)
        return g, self.head(g)


class MoCo(nn.Module):
    """MoCo-v2 with optional multi-crop queries and kNN positives.

    Buffers: ``key_queue`` [K, D] and ``backbone_queue`` [K, C] (aligned, enqueued together), ``queue_ptr``.
    The queue pointer lives on the host (``self._ptr``, so that enqueueing never waits on the device) and is
    mirrored into the ``queue_ptr`` buffer for checkpoints; loading a state dict reads it back.
    """

    def __init__(self, *, arch: str, hidden_dim: int = 2048, dim: int = 128, queue_size: int = 65536,
                 temperature: float = 0.2, knn_k: int = 0, knn_weight: float = 0.4,
                 shuffle_bn_groups: int = 8, backbone_queue_dtype: torch.dtype = torch.float32,
                 sync_bn: bool = False, head_bn: bool = False, symmetric: bool = False) -> None:
        super().__init__()
        self.queue_size, self.temperature = queue_size, temperature
        self.knn_k, self.knn_weight = knn_k, knn_weight
        self.shuffle_bn_groups = shuffle_bn_groups
        self.symmetric = symmetric
        self.sync_bn = sync_bn
        self.encoder_q = Encoder(build_backbone(arch), hidden_dim=hidden_dim, out_dim=dim, head_bn=head_bn)
        if sync_bn:
            self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("key_queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        channels = self.encoder_q.backbone.num_features
        backbone_queue = F.normalize(torch.randn(queue_size, channels), dim=1) if knn_k > 0 else torch.zeros(0, channels)
        self.register_buffer("backbone_queue", backbone_queue.to(backbone_queue_dtype))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_enqueued", torch.zeros((), dtype=torch.long))
        self._ptr = 0
        self.register_load_state_dict_post_hook(_read_queue_ptr)

    # ------------------------------------------------------------------ momentum encoder
    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """θ' = m·θ' + (1-m)·θ (parameters only; the key encoder's BN statistics come from its own forwards)."""
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        k_params = list(self.encoder_k.parameters())
        torch._foreach_mul_(k_params, momentum)
        torch._foreach_add_(k_params, q_params, alpha=1.0 - momentum)

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Key encoder with shuffle-BN. x: [B, 3, H, W] -> (g_k [B, C], k [B, D]), both normalised, in input order.

        Across processes: the global key batch is shuffled, each rank encodes a slice, then it is un-shuffled.
        In one process: the batch is shuffled and split into ``shuffle_bn_groups`` groups whose BN statistics
        are computed separately, in one forward of the whole batch (:mod:`selfsup.moco.shuffle_bn`; groups of
        unequal size, when the batch does not divide, are one forward each).
        """
        if self.sync_bn:
            g, k = self.encoder_k([x])
            return F.normalize(g.float(), dim=1), F.normalize(k.float(), dim=1)
        if get_world_size() > 1:
            return self._encode_keys_ddp(x, generator)
        batch = x.shape[0]
        perm_host = torch.randperm(batch, device="cpu", generator=generator)
        perm, inverse = upload(perm_host, x.device), upload(torch.argsort(perm_host), x.device)
        groups = max(1, min(self.shuffle_bn_groups, batch // 2))
        shuffled = x[perm]
        if batch % groups == 0:
            with grouped_batch_norm(self.encoder_k, groups):
                g, k = self.encoder_k([shuffled])
        else:
            outs = [self.encoder_k([chunk]) for chunk in shuffled.chunk(groups)]
            g, k = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        return F.normalize(g.float(), dim=1)[inverse], F.normalize(k.float(), dim=1)[inverse]

    def _encode_keys_ddp(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
        rank, batch = get_rank(), x.shape[0]
        x_all = all_gather(x)
        perm = upload(torch.randperm(x_all.shape[0], device="cpu", generator=generator), x.device)
        if dist.is_initialized():
            dist.broadcast(perm, src=0)  # every rank uses rank 0's permutation
        mine = perm[rank * batch:(rank + 1) * batch]
        g, k = self.encoder_k([x_all[mine]])
        g_all, k_all = all_gather(F.normalize(g.float(), dim=1)), all_gather(F.normalize(k.float(), dim=1))
        inverse = torch.argsort(perm)[rank * batch:(rank + 1) * batch]
        return g_all[inverse], k_all[inverse]

    # ------------------------------------------------------------------ queues
    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, backbone_keys: Optional[torch.Tensor] = None) -> None:
        """FIFO-replace the oldest entries with ``keys`` [B_global, D] (and backbone keys [B_global, C])."""
        n = keys.shape[0]
        if self.queue_size % n != 0:
            raise ValueError(f"queue size {self.queue_size} must be divisible by the global batch {n}")
        ptr = self._ptr
        self.key_queue[ptr:ptr + n] = keys.to(self.key_queue.dtype)
        if self.knn_k > 0 and backbone_keys is not None:
            self.backbone_queue[ptr:ptr + n] = backbone_keys.to(self.backbone_queue.dtype)
        self._ptr = (ptr + n) % self.queue_size
        self.queue_ptr.fill_(self._ptr)  # the checkpointed mirror: a device write, no read-back
        self.num_enqueued.add_(n)

    # ------------------------------------------------------------------ step
    def forward(self, views: List[torch.Tensor], *, momentum: float, use_knn: bool = False,
                generator: Optional[torch.Generator] = None, query_encoder: Optional[nn.Module] = None) -> Tuple[Dict[str, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
        """views = [query (large crop 0), key (large crop 1), small crops...] each [B, 3, h, w].

        Returns (losses and stats, (keys, backbone keys) to enqueue after the optimiser step, gathered
        from all ranks). Losses use the queue state from before this step's enqueue.
        ``query_encoder``: ``encoder_q`` wrapped in DDP when distributed (kept outside the state_dict).
        """
        batch = views[0].shape[0]
        # symmetric: the key crop is also a query, whose positive is the query crop's key
        queries = [views[0]] + ([views[1]] if self.symmetric else []) + list(views[2:])
        g_q, z_q = (query_encoder or self.encoder_q)(queries)  # [B*(1+s+n), C], [B*(1+s+n), D]
        q = F.normalize(z_q.float(), dim=1)
        with torch.no_grad():
            self.momentum_update(momentum)
            key_views = torch.cat([views[1], views[0]]) if self.symmetric else views[1]
            g_k, k = self.encode_keys(key_views, generator)
        if self.symmetric:  # rows: key of crop 1 (enqueued) | key of crop 0 (positive of the crop-1 query only)
            g_k, (k, k_swap) = g_k[:batch], k.split(batch)
            k_rows = torch.cat([k, k_swap, k.repeat(len(views) - 2, 1)])
        else:
            k_rows = k.repeat(len(queries), 1)  # every query row uses the one key of its image as positive
        key_queue = self.key_queue.detach()
        with torch.autocast(q.device.type, enabled=False):  # queue products in the queues' dtypes, not bf16
            l_neg = queue_logits(q, key_queue)  # [N, K] fp32, shared by both losses
            loss_inst, stats = instance_loss(q, k_rows, key_queue, temperature=self.temperature, l_neg=l_neg)
            if self.knn_k > 0 and use_knn:
                neighbours = mine_neighbours(F.normalize(g_q.detach().float(), dim=1), self.backbone_queue, self.knn_k)
                loss_nn = knn_positives_loss(q, key_queue, neighbours, temperature=self.temperature, l_neg=l_neg)
        out = dict(stats, loss_inst=loss_inst.detach())
        loss = loss_inst
        if self.knn_k > 0 and use_knn:
            out["loss_nn"] = loss_nn.detach()
            loss = loss + self.knn_weight * loss_nn
        out["loss"] = loss
        return out, (all_gather(k), all_gather(g_k))


def _read_queue_ptr(module: MoCo, _incompatible) -> None:
    """After ``load_state_dict``: the host pointer follows the loaded buffer (one read, at load time)."""
    module._ptr = int(module.queue_ptr)
