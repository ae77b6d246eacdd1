"""Pretraining view generation: box sampling, both augmentation paths, determinism, the loader."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.transforms import RandomResizedCrop

from selfsup.augment import (AugmentConfig, GpuMultiViewAugment, MultiViewTransform, build_pretrain_loader,
                             overlap_fraction, sample_box, sample_constrained_box,
                             sample_multicrop_boxes, sample_view_params)
from selfsup.augment import kernels as K
from selfsup.augment.cpu import apply_auto_augment_op
from selfsup.augment.decode import decode_reduced
from selfsup.augment.loader import PretrainViews, _collate_region

pytestmark = pytest.mark.timeout(60)


def _texture(rng, h, w):
    base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BICUBIC)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(12):
        _texture(rng, 240, 320).save(root / f"{i:03d}.jpg", quality=90)
    _texture(rng, 200, 300).save(root / "extra.png")
    return root


def _files(root):
    return sorted(str(p) for p in root.iterdir())


# ---- box sampling -----------------------------------------------------------------------------

def _quantiles(x):
    return np.quantile(np.asarray(x), np.linspace(0.05, 0.95, 19))


def test_box_distribution_matches_torchvision():
    h, w, n = 480, 640, 4000
    rng = np.random.default_rng(0)
    ours = [sample_box(rng, h, w, (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    torch.manual_seed(0)
    img = torch.empty(3, h, w)
    ref = [RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    for stat in (lambda b: b[2] * b[3] / (h * w), lambda b: math.log(b[3] / b[2]),
                 lambda b: (b[0] + b[2] / 2) / h, lambda b: (b[1] + b[3] / 2) / w):
        assert np.abs(_quantiles([stat(b) for b in ours]) - _quantiles([stat(b) for b in ref])).max() < 0.03
    for t, l, bh, bw in ours:
        assert 0 <= t and 0 <= l and t + bh <= h and l + bw <= w


def test_box_fallback_is_torchvision_centre_crop():
    img = torch.empty(3, 10, 1000)  # no box of this scale and ratio fits: 10 tries fail
    box = sample_box(np.random.default_rng(0), 10, 1000, (0.9, 1.0), (3 / 4, 4 / 3))
    assert box == tuple(RandomResizedCrop.get_params(img, [0.9, 1.0], [3 / 4, 4 / 3]))


def test_small_crops_overlap_rule_and_fallback():
    cfg = AugmentConfig()
    rng = np.random.default_rng(1)
    met_big_key = []
    for _ in range(1500):
        boxes, met = sample_multicrop_boxes(rng, 480, 640, cfg)
        assert len(boxes) == 6 and met[:2] == [True, True]
        key_frac = boxes[1][2] * boxes[1][3] / (480 * 640)
        for box, ok in zip(boxes[2:], met[2:]):
            if ok:
                assert overlap_fraction(box, boxes[1]) >= 0.1
            if key_frac >= 0.5:
                met_big_key.append(ok)
    assert np.mean(met_big_key) >= 0.99
    # infeasible rule: every try fails, the box is an unconstrained valid box
    box, ok = sample_constrained_box(rng, 480, 640, (0, 0, 100, 100), scale=(0.05, 0.14), ratio=(3 / 4, 4 / 3),
                                     constraint="overlap", min_overlap=1.01)
    assert not ok and box[0] + box[2] <= 480 and box[1] + box[3] <= 640


def test_small_crops_inside_variant():
    cfg = AugmentConfig(constraint="inside")
    rng = np.random.default_rng(2)
    met_all = []
    for _ in range(1000):
        boxes, met = sample_multicrop_boxes(rng, 480, 640, cfg)
        kt, kl, kh, kw = boxes[1]
        for (t, l, h, w), ok in zip(boxes[2:], met[2:]):
            if ok:
                assert kt <= t and kl <= l and t + h <= kt + kh and l + w <= kl + kw
            met_all.append(ok)
    assert np.mean(met_all) > 0.8
    box, ok = sample_constrained_box(rng, 480, 640, (0, 0, 20, 20), scale=(0.05, 0.14), ratio=(3 / 4, 4 / 3),
                                     constraint="inside")
    assert not ok  # a 20 px key cannot hold a small crop: unconstrained fallback


# ---- view parameters --------------------------------------------------------------------------

def test_auto_augment_branch_frequencies():
    cfg = AugmentConfig()
    draws = [sample_view_params(cfg, 0, 0, i, 480, 640) for i in range(2000)]
    aa = np.array([[p.auto_augment for p in views] for views in draws])
    assert not aa[:, 1].any()  # the key crop is always standard
    for v in (0, 2, 3, 4, 5):
        assert abs(aa[:, v].mean() - 0.5) < 0.04
    std = [p for views in draws for p in views if not p.auto_augment]
    assert abs(np.mean([p.flip for p in std]) - 0.5) < 0.03
    assert abs(np.mean([p.jitter for p in std]) - 0.8) < 0.03
    assert abs(np.mean([p.grayscale for p in std]) - 0.2) < 0.03
    assert abs(np.mean([p.blur for p in std]) - 0.5) < 0.03
    f = np.array([p.factors for p in std])
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and np.abs(f[:, 3]).max() <= 0.1
    assert all(0.1 <= p.sigma <= 2.0 for p in std)
    moco = sample_view_params(AugmentConfig.preset("moco"), 0, 0, 0, 480, 640)
    assert len(moco) == 2 and not any(p.auto_augment for p in moco)


def test_transform_debug_hook_reports_branches(image_dir):
    seen = {}
    t = MultiViewTransform(AugmentConfig(), seed=3, debug_hook=lambda i, ps: seen.__setitem__(i, ps))
    with Image.open(_files(image_dir)[0]) as img:
        views = t(img, 7)
    assert [v.shape[-1] for v in views] == [160, 160, 96, 96, 96, 96]
    assert len(seen[7]) == 6 and not seen[7][1].auto_augment


# ---- determinism ------------------------------------------------------------------------------

def test_cpu_transform_deterministic_per_seed_epoch_index(image_dir):
    path = _files(image_dir)[1]
    a, b = MultiViewTransform(AugmentConfig(), seed=5), MultiViewTransform(AugmentConfig(), seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    torch.manual_seed(123)  # the global RNG plays no part
    va = a(Image.open(path), 4)
    torch.manual_seed(999)
    vb = b(Image.open(path), 4)
    assert all(torch.equal(x, y) for x, y in zip(va, vb))
    b.set_epoch(3)
    assert not torch.equal(va[0], b(Image.open(path), 4)[0])


def test_gpu_path_deterministic_on_cpu_tensors(image_dir):
    cfg = AugmentConfig()
    ds = PretrainViews(_files(image_dir), cfg, seed=5, mode="region")
    aug = GpuMultiViewAugment(cfg)
    out1 = aug(*_collate_region([ds[(1, i)] for i in range(6)]))
    out2 = aug(*_collate_region([ds[(1, i)] for i in reversed(range(6))]))
    for x, y in zip(out1, out2):
        assert torch.equal(x, y.flip(0))


# ---- CPU vs GPU path --------------------------------------------------------------------------

_U8 = np.random.default_rng(4).integers(0, 256, (8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize("name,mag", [("ShearX", 0.2), ("TranslateX", 10.0), ("TranslateY", -7.0), ("Rotate", 20.0),
                                      ("Brightness", 0.5), ("Color", -0.5), ("Contrast", 0.6), ("Sharpness", 0.7),
                                      ("Posterize", 4.0), ("Solarize", 128.0), ("AutoContrast", 0.0),
                                      ("Equalize", 0.0), ("Invert", 0.0)])
def test_auto_augment_kernels_match_pil(name, mag):
    img = Image.fromarray(_U8).resize((48, 48), Image.BICUBIC)
    u = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float()
    ref = torch.from_numpy(np.asarray(apply_auto_augment_op(img, name, mag)).copy()).permute(2, 0, 1)[None].float()
    diff = (K.auto_augment_op(u, name, torch.tensor([mag])) - ref).abs()
    assert diff.mean() < 3.0 and (diff > 1).float().mean() < 0.15  # shear: nearest rounding at half pixels


@pytest.mark.parametrize("op,pil,f", [(K.brightness, TF.adjust_brightness, 1.3), (K.contrast, TF.adjust_contrast, 0.7),
                                      (K.saturation, TF.adjust_saturation, 1.4), (K.hue, TF.adjust_hue, -0.08)])
def test_jitter_kernels_match_torchvision(op, pil, f):
    img = Image.fromarray(_U8).resize((48, 48), Image.BICUBIC)
    diff = (op(TF.to_tensor(img)[None], torch.tensor([f])) - TF.to_tensor(pil(img, f))[None]).abs()
    assert diff.mean() * 255 < 1.5


def test_blur_kernel_matches_pil_per_sample_sigma():
    img = Image.fromarray(_U8).resize((48, 48), Image.BICUBIC)
    x = TF.to_tensor(img)[None].repeat(3, 1, 1, 1)
    sigmas = torch.tensor([0.1, 1.0, 2.0])
    out = K.gaussian_blur(x, sigmas, 2.0)
    for i, s in enumerate(sigmas.tolist()):
        ref = TF.to_tensor(img.filter(ImageFilter.GaussianBlur(radius=s)))
        assert (out[i] - ref).abs().mean() * 255 < 1.5


def test_cpu_and_gpu_paths_agree(image_dir):
    """Same (seed, epoch, index) -> the same views up to resampling/rounding differences, so the two
    paths share crop, jitter, grayscale, blur, flip and AutoAugment distributions."""
    cfg = AugmentConfig()
    files = [f for f in _files(image_dir) if f.endswith(".jpg")]
    cpu_t = MultiViewTransform(cfg, seed=11)
    ds = PretrainViews(files, cfg, seed=11, mode="region")
    aug = GpuMultiViewAugment(cfg)
    cpu_views, gpu_views = [[] for _ in range(6)], [[] for _ in range(6)]
    for epoch in range(4):
        keys = [(epoch, i) for i in range(len(files))]
        gpu = aug(*_collate_region([ds[k] for k in keys]))
        for v in range(6):
            gpu_views[v].append(gpu[v])
            cpu_views[v].append(torch.stack([cpu_t(Image.open(files[i]), i, epoch=e)[v] for e, i in keys]))
    for v in range(6):
        a, b = torch.cat(cpu_views[v]), torch.cat(gpu_views[v])
        assert (a - b).abs().mean() < 0.08  # normalised units (~5/255 in pixels)
        assert abs(a.mean() - b.mean()) < 0.03 and abs(a.std() - b.std()) < 0.03
        per_sample = (a - b).abs().mean(dim=(1, 2, 3))
        assert (per_sample < 0.3).float().mean() > 0.95


def test_reduced_jpeg_decode_keeps_view_resolution(tmp_path):
    path = tmp_path / "big.jpg"
    _texture(np.random.default_rng(0), 1600, 2400).save(path)
    img, boxes = decode_reduced(Image.open(path), [(0, 0, 1600, 1600), (100, 200, 1200, 1000)], [224, 224])
    assert img.size[0] < 2400  # DCT-domain downscaling happened
    for x1, y1, x2, y2 in boxes:
        assert min(x2 - x1, y2 - y1) >= 224


# ---- loader -----------------------------------------------------------------------------------

@pytest.mark.parametrize("gpu_aug", [False, True])
@pytest.mark.parametrize("recipe,sizes", [("moco", [224, 224]), ("ours", [160, 160, 96, 96, 96, 96])])
def test_loader_shapes(image_dir, recipe, sizes, gpu_aug):
    loader = build_pretrain_loader(image_dir, AugmentConfig.preset(recipe), batch_size=4, num_workers=0, seed=0,
                                   gpu_aug=gpu_aug)
    assert len(loader) == 13 // 4
    views = next(iter(loader))
    assert [tuple(v.shape) for v in views] == [(4, 3, s, s) for s in sizes]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


@pytest.mark.parametrize("gpu_aug", [False, True])
def test_loader_resume_matches_uninterrupted_epoch(image_dir, gpu_aug):
    kw = dict(batch_size=3, seed=7, gpu_aug=gpu_aug)
    full = build_pretrain_loader(image_dir, AugmentConfig(), num_workers=2, **kw)
    full.set_epoch(2)
    ref = list(full)
    resumed = build_pretrain_loader(image_dir, AugmentConfig(), num_workers=0, **kw)
    resumed.set_epoch(2, start_step=2)
    got = list(resumed)
    assert len(ref) == len(full) == 4 and len(got) == 2
    for a, b in zip(ref[2:], got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_loader_shards_and_skips_corrupt_files(image_dir, tmp_path):
    files = _files(image_dir)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    files = files + [str(bad)]
    shards = [build_pretrain_loader(files, AugmentConfig.preset("moco"), batch_size=2, num_workers=0, seed=1,
                                    rank=r, world_size=2) for r in range(2)]
    idx = [set(s.epoch_indices(0).tolist()) for s in shards]
    assert not idx[0] & idx[1] and idx[0] | idx[1] == set(range(len(files)))
    assert sum(1 for s in shards for _ in s) == 2 * (7 // 2)
    for mode in ("cpu", "region", "bytes"):
        ds = PretrainViews(files, AugmentConfig(), seed=1, mode=mode)
        item = ds[(0, len(files) - 1)]  # the corrupt file: the next readable one takes its place
        assert ds.num_skipped == 1 and len(item) in (3, 6)
