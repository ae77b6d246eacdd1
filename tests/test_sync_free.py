"""The sync-free hot paths keep the numbers: grouped shuffle-BN = per-group forwards, the MoCo step's loss
and gradients = the straightforward implementation, the host queue pointer, the NaN guard, pad_batch and
the chunked crops (issue 20; references are written out here, the plain per-group / per-image versions)."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from selfsup.augment import AugmentConfig, GpuMultiViewAugment
from selfsup.moco import model as moco_model
from selfsup.moco.contrastive import queue_logits
from selfsup.moco.model import MoCo
from selfsup.moco.shuffle_bn import grouped_batch_norm
from selfsup.nan_guard import NonFiniteGuard
from selfsup.augment.gpu import pad_batch

pytestmark = pytest.mark.timeout(120)


def tiny_moco(**kw):
    args = dict(arch="resnet_tiny", hidden_dim=32, dim=8, queue_size=16, head_bn=True)
    args.update(kw)
    return MoCo(**args)


def _bns(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("shape", [(8, 6, 10, 12), (8, 6, 10, 12, "channels_last"), (12, 5), (8, 4, 7)],
                         ids=["2d", "2d_channels_last", "1d", "1d_seq"])
def test_grouped_batch_norm_equals_per_group_forwards(shape, momentum):
    """One BN forward with per-group statistics = G forwards of the groups: outputs, running stats, counter."""
    torch.manual_seed(0)
    *dims, fmt = shape if shape[-1] == "channels_last" else (*shape, None)
    bn = (nn.BatchNorm2d if len(dims) == 4 else nn.BatchNorm1d)(dims[1], momentum=momentum).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    ref = copy.deepcopy(bn)
    x = torch.randn(*dims) * 3 + 1
    if fmt:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # twice: the second update starts from non-default running stats
        with grouped_batch_norm(bn, 4):
            y = bn(x)
        y_ref = torch.cat([ref(c) for c in x.chunk(4)])
        assert torch.allclose(y, y_ref, atol=1e-6, rtol=1e-6), (y - y_ref).abs().max()
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6, rtol=1e-6)
    assert torch.allclose(bn.running_var, ref.running_var, atol=1e-6, rtol=1e-6)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 8
    assert "forward" not in vars(bn)  # the override ends with the block


def test_grouped_shuffle_bn_encoder_equals_per_group_forwards():
    """The whole key encoder (backbone BatchNorm2d + head BatchNorm1d) in one forward = 2 group forwards.

    Through ~10 BN layers of 4-image groups the fp32 rounding of a different reduction order grows to a
    few 1e-7 relative; hence a relative bound here (each layer alone matches to 1e-6, above)."""
    torch.manual_seed(0)
    enc = tiny_moco().encoder_k.train()
    ref = copy.deepcopy(enc)
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        with grouped_batch_norm(enc, 2):
            g, z = enc([x])
        outs = [ref([chunk]) for chunk in x.chunk(2)]
    for a, b in ((g, torch.cat([o[0] for o in outs])), (z, torch.cat([o[1] for o in outs]))):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    for a, b in zip(_bns(enc), _bns(ref)):
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
        assert torch.allclose(a.running_var, b.running_var, atol=1e-6)
    with torch.no_grad():  # the whole-batch statistics differ: the grouping is real
        assert not torch.allclose(enc([x])[1], z, atol=1e-3)


def _reference_step(m: MoCo, views, *, momentum, use_knn, generator):
    """The plain MoCo step: per-group key forwards, each loss computing its own queue logits."""
    g_q, z_q = m.encoder_q(views[:1] + views[2:])
    q = F.normalize(z_q.float(), dim=1)
    with torch.no_grad():
        m.momentum_update(momentum)
        x = views[1]
        perm = torch.randperm(x.shape[0], generator=generator)
        outs = [m.encoder_k([c]) for c in x[perm].chunk(max(1, min(m.shuffle_bn_groups, x.shape[0] // 2)))]
        inv = torch.argsort(perm)
        g_k = F.normalize(torch.cat([o[0] for o in outs]).float(), dim=1)[inv]
        k = F.normalize(torch.cat([o[1] for o in outs]).float(), dim=1)[inv]
    k_rows = k.repeat(1 + len(views) - 2, 1)
    logits = torch.cat([(q * k_rows).sum(1, keepdim=True), q @ m.key_queue.t()], 1) / m.temperature
    loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))
    if use_knn:
        nn_idx = (F.normalize(g_q.detach(), dim=1) @ m.backbone_queue.t()).topk(m.knn_k, dim=1).indices
        log_prob = F.log_softmax(q @ m.key_queue.t() / m.temperature, dim=1)
        loss = loss + m.knn_weight * -log_prob.gather(1, nn_idx).mean()
    return loss, k, g_k


def test_moco_step_keeps_loss_and_gradients():
    """Multi-crop + kNN positives: loss, gradients and keys as the plain step (shared fp32 queue logits,
    host permutation). The key encoder runs on running statistics here, so that the fp32 rounding of the
    grouped BN (tested above) is not amplified through the loss; the shuffle and un-shuffle still run."""
    torch.manual_seed(0)
    m = tiny_moco(knn_k=3, shuffle_bn_groups=4)
    m.encoder_k.eval()
    ref = copy.deepcopy(m)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    out, (keys, g_keys) = m(views, momentum=0.99, use_knn=True, generator=torch.Generator().manual_seed(3))
    loss_ref, k_ref, g_ref = _reference_step(ref, views, momentum=0.99, use_knn=True,
                                             generator=torch.Generator().manual_seed(3))
    out["loss"].backward()
    loss_ref.backward()
    assert abs(out["loss"].item() - loss_ref.item()) < 1e-6 and "loss_nn" in out
    assert torch.allclose(keys, k_ref, atol=1e-6) and torch.allclose(g_keys, g_ref, atol=1e-6)
    # Relative to each gradient's largest entry: back through the encoder the fp32 rounding of another
    # summation order reaches ~1e-5 of that on some CPUs (CI saw conv1: 0.13052 vs 0.13051); a wrong
    # positive, queue row or permutation moves the gradients by far more than 1e-4 of it (1e-6 absolute: the
    # bias before a BN, whose gradient is 0 up to rounding).
    for (name, p), p_ref in zip(m.encoder_q.named_parameters(), ref.encoder_q.parameters()):
        assert (p.grad - p_ref.grad).abs().max() <= 1e-4 * p_ref.grad.abs().max() + 1e-6, name


def test_queue_logits_in_fp32_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast the [N, K] queue logits reach both losses in fp32, computed once."""
    torch.manual_seed(0)
    m = tiny_moco(knn_k=3)
    seen = []
    for name in ("instance_loss", "knn_positives_loss"):
        real = getattr(moco_model, name)
        monkeypatch.setattr(moco_model, name, lambda *a, _real=real, **kw: (seen.append(kw["l_neg"]), _real(*a, **kw))[1])
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(views, momentum=0.99, use_knn=True)
        q = F.normalize(torch.randn(4, 8), dim=1)
        assert queue_logits(q, m.key_queue).dtype == torch.float32  # autocast is off inside
    assert len(seen) == 2 and seen[0] is seen[1] and seen[0].dtype == torch.float32
    assert torch.equal(queue_logits(q, m.key_queue), q @ m.key_queue.t())


def test_queue_pointer_lives_on_the_host_and_follows_loaded_state():
    m = tiny_moco()
    m.enqueue(torch.zeros(4, 8))
    assert m._ptr == int(m.queue_ptr) == 4
    fresh = tiny_moco()
    fresh.load_state_dict(m.state_dict())
    assert fresh._ptr == 4
    fresh.enqueue(torch.ones(4, 8))
    assert int(fresh.queue_ptr) == 8 and torch.equal(fresh.key_queue[4:8], torch.ones(4, 8))


def test_nan_guard_reports_the_first_bad_step_and_bad_parameters():
    guard = NonFiniteGuard(every=3)
    assert guard.due(3) and not guard.due(4)
    for i, v in enumerate([1.0, float("nan"), float("inf")]):
        guard.update(torch.tensor(v), f"step {i}")
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 1; kept"):
        guard.check(where="; kept")
    guard.update(torch.tensor(2.0), "step 3")
    guard.check([torch.ones(3)])  # finite: no error, and the record was reset
    with pytest.raises(FloatingPointError, match="non-finite parameters"):
        guard.check([torch.tensor([1.0, float("inf")])])
    with pytest.raises(ValueError, match="nan_check_every=0"):
        NonFiniteGuard(0)


def _pad_reference(images):
    h, w = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    out = images[0].new_empty(len(images), 3, h, w)
    for i, im in enumerate(images):
        ih, iw = im.shape[1:]
        out[i, :, :ih, :iw] = im
        out[i, :, ih:, :iw] = im[:, -1:, :]
        out[i, :, :, iw:] = out[i, :, :, iw - 1:iw]
    return out


@pytest.mark.parametrize("sizes", [[(20, 30)] * 3, [(20, 30), (24, 18), (20, 30), (9, 40), (24, 18)]],
                         ids=["one_size", "mixed"])
def test_pad_batch_equals_per_image_padding(sizes):
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    assert torch.equal(pad_batch(images), _pad_reference(images))


def test_chunked_crops_equal_whole_batch_crops():
    """Converting 2 images at a time to float gives the same views as converting the whole batch."""
    from selfsup.augment.params import collate_params, sample_view_params
    cfg = AugmentConfig.preset("ours")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 60, 80), generator=g, dtype=torch.uint8)
    params = [sample_view_params(cfg, 0, 0, i, 60, 80) for i in range(5)]
    boxes = torch.stack([torch.tensor([(l, t, l + w, t + h) for t, l, h, w in (p.box for p in ps)], dtype=torch.float32)
                         for ps in params])
    whole = GpuMultiViewAugment(cfg, chunk=64)(images, boxes, collate_params(params))
    chunked = GpuMultiViewAugment(cfg, chunk=2)(images, boxes, collate_params(params))
    assert len(whole) == 6 and all(torch.equal(a, b) for a, b in zip(whole, chunked))
