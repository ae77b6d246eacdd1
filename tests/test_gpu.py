"""CUDA paths (skipped without CUDA; run on a GPU machine by ``launch/gpu_check.sh``): nvjpeg batched
decode, GPU augmentation vs the CPU path, no host-device sync in the hot paths, the bf16 + channels_last
MoCo step, torch.compile, a 1-process NCCL process group, the multi-task models in bf16."""
import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(16):
        base = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        size = (640, 480) if i % 3 else (480, 640)  # two COCO sizes: pad_batch pads by size group
        Image.fromarray(base).resize(size, Image.BICUBIC).save(root / f"{i:03d}.jpg", quality=90)
    return root


def _tiny_moco(**kw):
    from selfsup.moco.model import MoCo
    args = dict(arch="resnet_tiny", hidden_dim=64, dim=16, queue_size=64, knn_k=4, shuffle_bn_groups=4)
    args.update(kw)
    return MoCo(**args)


def test_nvjpeg_batched_decode_matches_cpu_decode(jpeg_dir):
    from torchvision.io import decode_jpeg, read_file
    from selfsup.augment.gpu import decode_on_device
    data = [read_file(str(p)) for p in sorted(jpeg_dir.iterdir())]
    gpu = decode_on_device(data, CUDA)
    for d, g in zip(data, gpu):
        cpu = decode_jpeg(d)
        assert g.device.type == "cuda" and g.shape == cpu.shape and g.dtype == torch.uint8
        assert (g.cpu().float() - cpu.float()).abs().mean() < 1.0  # IDCT rounding only


@pytest.mark.parametrize("recipe", ["moco", "ours"])
def test_gpu_augmentation_statistics_match_cpu_path(jpeg_dir, recipe):
    """nvjpeg + device augmentation on CUDA vs the torchvision/PIL pipeline: same per-view statistics
    (same (seed, epoch, index) parameters on both paths)."""
    from selfsup.augment import AugmentConfig, build_pretrain_loader
    cfg = AugmentConfig.preset(recipe, decode="gpu")
    kw = dict(batch_size=8, num_workers=2, seed=3, device=CUDA)
    gpu_views = list(build_pretrain_loader(jpeg_dir, cfg, gpu_aug=True, **kw))
    cpu_views = list(build_pretrain_loader(jpeg_dir, cfg, gpu_aug=False, **kw))
    for v in range(len(gpu_views[0])):
        a = torch.cat([b[v] for b in gpu_views]).cpu()
        b = torch.cat([b[v] for b in cpu_views]).cpu()
        assert a.shape == b.shape
        assert (a - b).abs().mean() < 0.1
        assert abs(a.mean() - b.mean()) < 0.05 and abs(a.std() - b.std()) < 0.05


def test_gpu_augmentation_on_cuda_equals_cpu_tensors(jpeg_dir):
    """The same device code on CUDA and on CPU tensors gives the same views (float rounding only)."""
    from selfsup.augment import AugmentConfig, GpuMultiViewAugment
    from selfsup.augment.loader import PretrainViews, _collate_region
    cfg = AugmentConfig.preset("ours")
    ds = PretrainViews(sorted(str(p) for p in jpeg_dir.iterdir()), cfg, seed=1, mode="region")
    images, boxes, params = _collate_region([ds[(0, i)] for i in range(8)])
    aug = GpuMultiViewAugment(cfg)
    cpu = aug(images, boxes, params)
    gpu = aug(images.to(CUDA), boxes, params)
    for a, b in zip(cpu, gpu):
        assert (a - b.cpu()).abs().max() < 0.05 and (a - b.cpu()).abs().mean() < 1e-3


def test_hot_paths_never_wait_on_the_device(jpeg_dir):
    """Augmentation of a decoded batch and a whole MoCo step (bf16, shuffle-BN, kNN loss, enqueue, NaN guard)
    run under ``torch.cuda.set_sync_debug_mode("error")``: any host-device sync raises."""
    from selfsup.augment import AugmentConfig, GpuMultiViewAugment
    from selfsup.augment.loader import PretrainViews, _collate_region
    from selfsup.nan_guard import NonFiniteGuard
    cfg = AugmentConfig.preset("ours", large_size=64, small_size=32)
    ds = PretrainViews(sorted(str(p) for p in jpeg_dir.iterdir()), cfg, seed=1, mode="region")
    images, boxes, params = _collate_region([ds[(0, i)] for i in range(8)])
    images = images.pin_memory().to(CUDA, non_blocking=True)
    aug = GpuMultiViewAugment(cfg)
    model = _tiny_moco().to(CUDA).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.01, momentum=0.9)
    guard = NonFiniteGuard(every=1000)

    def step(gen_seed):
        views = aug(images, boxes, params)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, keys = model(views, momentum=0.99, use_knn=True, generator=torch.Generator().manual_seed(gen_seed))
        guard.update(out["loss"], f"step {gen_seed}")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        model.enqueue(*keys)

    step(0)  # warm-up: constants are made on the device once, cuDNN picks its algorithms
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 3):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    guard.check(model.parameters())


def test_bf16_channels_last_moco_step_close_to_fp32():
    from selfsup.moco.model import MoCo
    torch.manual_seed(0)
    m32 = MoCo(arch="resnet18", hidden_dim=256, dim=64, queue_size=512, knn_k=5).to(CUDA)
    m16 = copy.deepcopy(m32).to(memory_format=torch.channels_last)
    g = torch.Generator(device="cpu").manual_seed(0)
    views = [torch.randn(32, 3, s, s, generator=g).to(CUDA) for s in (160, 160, 96, 96)]
    out32, _ = m32(views, momentum=0.99, use_knn=True, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out16, _ = m16([v.contiguous(memory_format=torch.channels_last) for v in views], momentum=0.99,
                       use_knn=True, generator=torch.Generator().manual_seed(1))
    out16["loss"].backward()
    assert out16["loss"].dtype == torch.float32 and torch.isfinite(out16["loss"])
    assert abs(out16["loss"].item() - out32["loss"].item()) < 0.05 * out32["loss"].item()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m16.encoder_q.parameters())


def test_torch_compile_backbone_matches_eager():
    torch.manual_seed(0)
    m = _tiny_moco().to(CUDA)
    x = torch.randn(8, 3, 64, 64, device=CUDA)
    m.eval()
    eager = m.encoder_q.backbone(x)
    compiled = torch.compile(m.encoder_q.backbone)
    assert torch.allclose(compiled(x), eager, atol=1e-3, rtol=1e-3)


def test_one_process_nccl_group(tmp_path):
    import torch.distributed as dist
    from selfsup.launcher import free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=CUDA)
    try:
        t = torch.ones(4, device=CUDA)
        dist.all_reduce(t)
        assert t.sum().item() == 4
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["mtl_baseline", "pad_net", "mti_net"])
def test_multitask_models_bf16_channels_last(arch):
    from downstream.mtl.bench import synthetic_batch
    from downstream.mtl.losses import MultiTaskLoss
    from downstream.mtl.models import build_model
    from downstream.mtl.tasks import TaskSet, loss_weights
    tasks = TaskSet("nyud", ("semseg", "depth"), ("normals", "edge"))
    model = build_model(arch, tasks=tasks, backbone="hrnet18").to(CUDA).to(memory_format=torch.channels_last)
    images, targets = synthetic_batch(tasks, 2, (128, 160), CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images.contiguous(memory_format=torch.channels_last))
    total, _ = MultiTaskLoss(loss_weights(tasks.dataset, tasks.all))(out, targets)
    total.backward()
    assert torch.isfinite(total) and out["final"]["semseg"].shape[-2:] == (128, 160)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
