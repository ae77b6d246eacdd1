"""Synthetic data generator + readers of the real formats + joint multi-task transforms."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import (DATASETS, ClassificationFolder, ImageFolder, build_dataset, ensure_embedded_data,
                          generate_datasets, resolve_data_root)
from frozen.davis import DAVIS2017
from frozen.voc import VOC2012Segmentation
from downstream.datasets import NYUDMT, PascalContextMT
from downstream.datasets import mt_transforms as T
from selfsup.data.labels import voc_palette
from selfsup.data.scenes import MAX_WALL_DEPTH_M
from selfsup.data.synthetic import NYUD_WALL_DEPTH_M
from selfsup.data.preview import save_sample_grid

REPO = Path(__file__).resolve().parents[1]
SIZE, NUM = 48, 12


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return generate_datasets(tmp_path_factory.mktemp("embedded"), size=SIZE, num=NUM, seed=0)


def _copy(root: Path, fmt: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root / fmt, tmp_path / fmt))


def test_pascal_context_sample(data_root):
    ds = build_dataset("pascal_context", root=data_root / "pascal_context", split="train")
    assert len(ds) == NUM // 2 and ds.tasks == ["semseg", "human_parts", "sal", "normals", "edge"]
    saw_person = saw_no_person = False
    for i in range(len(ds)):
        s = ds[i]
        H, W = s["meta"]["size"]
        assert H == SIZE and s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
        assert 0 <= s["image"].min() and s["image"].max() <= 1
        assert s["semseg"].shape == (H, W) and s["semseg"].dtype == torch.int64
        assert set(s["semseg"].unique().tolist()) <= set(range(21)) | {255}
        parts = s["human_parts"]
        if (parts == 255).all():
            saw_no_person = True
            assert not (s["semseg"] == 15).any()
        else:
            saw_person = True
            assert set(parts.unique().tolist()) <= set(range(7))
            assert not ((parts > 0) & (s["semseg"] != 15)).any()  # parts lie on person pixels (persons with parts)
        assert s["sal"].shape == (1, H, W) and set(s["sal"].unique().tolist()) <= {0.0, 1.0}
        assert s["edge"].shape == (1, H, W) and set(s["edge"].unique().tolist()) <= {0.0, 1.0}
        assert s["edge"].sum() > 0
        norm = s["normals"].norm(dim=0)
        valid = norm > 0  # only on the NYU-compatible LabelMap classes
        assert torch.allclose(norm[valid], torch.ones(()), atol=1e-4)
    assert saw_person and saw_no_person


def test_nyud_sample(data_root):
    ds = NYUDMT(data_root / "nyud", split="val", tasks=["semseg", "depth", "normals", "edge"])
    s = ds[0]
    H, W = s["meta"]["size"]
    assert (H, W) == (SIZE, round(SIZE * 4 / 3))
    assert s["semseg"].dtype == torch.int64 and set(s["semseg"].unique().tolist()) <= set(range(40)) | {255}
    raw = np.array(Image.open(ds.label_path("semseg", s["meta"]["id"])))
    assert torch.equal(s["semseg"], torch.from_numpy(np.where(raw == 0, 255, raw.astype(np.int64) - 1)))
    assert s["depth"].shape == (1, H, W) and s["depth"].min() >= 0 and 0.5 < s["depth"].max() < 100
    # NYUD's rooms: every image's farthest pixel is its back wall, 3-6 m away (the clamp that keeps a visible
    # floor can only push a wall back, and at most to 6 m at this camera's range); the other formats' walls go
    # to MAX_WALL_DEPTH_M
    far = [float(ds[i]["depth"].max()) for i in range(len(ds))]
    lo, hi = NYUD_WALL_DEPTH_M
    assert all(lo - 1e-3 <= d <= hi + 1e-3 for d in far), far
    assert max(far) - min(far) > 0.3 * (hi - lo) and hi < MAX_WALL_DEPTH_M  # rooms differ in depth
    depth_valid, normal_valid = s["depth"][0] > 0, s["normals"].norm(dim=0) > 0
    assert torch.equal(depth_valid, normal_valid)
    assert s["edge"].shape == (1, H, W)
    assert set(ds[0].keys()) == {"image", "semseg", "depth", "normals", "edge", "meta"}


def test_voc_palette_and_void(data_root):
    ds = VOC2012Segmentation(data_root / "voc2012", split="val")
    image, mask = ds[0]
    assert image.shape[0] == 3 and mask.shape == image.shape[1:] and mask.dtype == torch.int64
    values = set(mask.unique().tolist())
    assert 255 in values and values <= set(range(21)) | {255}
    png = Image.open(ds.mask_path(ds.ids[0]))
    assert png.mode == "P"
    assert np.array_equal(np.array(png.getpalette()[:6]), [0, 0, 0, 128, 0, 0])
    assert np.array_equal(voc_palette()[15], [192, 128, 128])  # person


def test_davis_sequences(data_root):
    train, val = DAVIS2017(data_root / "davis2017", split="train"), DAVIS2017(data_root / "davis2017", split="val")
    assert len(train) + len(val) == 6 and not set(train.sequences) & set(val.sequences)
    item = val[0]
    assert len(item["frames"]) == len(item["annotations"]) == 24
    frames, masks = val.read_frames(0), val.read_annotations(0)
    assert frames.shape[:3] == masks.shape and frames.dtype == np.uint8
    n = val.num_objects(0)
    assert 1 <= n <= 3 and set(np.unique(masks).tolist()) <= set(range(n + 1))
    assert Image.open(item["annotations"][0]).mode == "P"


def test_classification_and_image_folders(data_root):
    ds = ClassificationFolder(data_root / "classification", split="train", transform=lambda im: im.size)
    assert len(ds.classes) == 20 and ds.classes[0] == "aeroplane"
    size, label = ds[len(ds) - 1]
    assert label == 19 and size == (SIZE, SIZE)
    images = build_dataset(str(data_root / "coco"))  # a plain path = unlabelled folder
    assert isinstance(images, ImageFolder) and len(images) == NUM and images.files == sorted(images.files)
    assert build_dataset("coco", root=data_root / "coco")[0].mode == "RGB"


def test_corrupt_images_skipped_and_counted(data_root, tmp_path):
    root = _copy(data_root, "coco", tmp_path)
    files = sorted((root / "train2017").glob("*.jpg"))
    files[2].write_bytes(files[2].read_bytes()[:200])  # truncated JPEG
    files[5].write_bytes(b"not an image at all")

    class ToTensor:
        needs_index = True

        def __call__(self, image, index):
            return torch.tensor(index)

    ds = ImageFolder(root, transform=ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    indices = torch.cat(list(loader))
    assert indices.tolist() == list(range(len(ds)))  # every index yields a sample
    assert ds.num_skipped == 2  # counted in the worker processes, visible here
    assert ds.skipped_files == [files[2], files[5]]


def test_generator_deterministic(tmp_path):
    a = generate_datasets(tmp_path / "a", size=32, num=4, seed=3, formats=["pascal_context", "nyud"], workers=1)
    b = generate_datasets(tmp_path / "b", size=32, num=4, seed=3, formats=["pascal_context", "nyud"], workers=2)
    c = generate_datasets(tmp_path / "c", size=32, num=4, seed=4, formats=["pascal_context"], workers=1)
    for rel in ["pascal_context/JPEGImages/2008_000001.jpg", "pascal_context/semseg/pascal-context/2008_000003.png",
                "nyud/depth/000002.npy", "nyud/normals/000004.npy"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "pascal_context/JPEGImages/2008_000001.jpg").read_bytes() != (c / "pascal_context/JPEGImages/2008_000001.jpg").read_bytes()


def test_missing_label_file_named(data_root, tmp_path):
    root = _copy(data_root, "pascal_context", tmp_path)
    victim = root / "normals_distill" / f"{(root / 'ImageSets/Context/train.txt').read_text().split()[1]}.png"
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        PascalContextMT(root, split="train", tasks=["semseg", "normals"])
    PascalContextMT(root, split="train", tasks=["semseg"])  # other tasks still load


def test_split_with_missing_ids(data_root, tmp_path):
    root = _copy(data_root, "nyud", tmp_path)
    with open(root / "gt_sets" / "train.txt", "a") as f:
        f.write("ghost_1\nghost_2\n")
    with pytest.raises(FileNotFoundError, match=r"2 of .*ghost_1.*ghost_2"):
        NYUDMT(root, split="train")


def _toy_sample(H=6, W=8):
    torch.manual_seed(0)
    semseg = torch.randint(0, 3, (H, W))
    return {
        "image": torch.stack([semseg.float() / 2, torch.rand(H, W), torch.rand(H, W)]),
        "semseg": semseg,
        "normals": torch.nn.functional.normalize(torch.randn(3, H, W), dim=0),
        "depth": torch.rand(1, H, W) + 1,
        "meta": {"id": "x", "size": (H, W)},
    }


def test_flip_negates_normals_x_and_keeps_alignment():
    s = _toy_sample()
    f = T.RandomHorizontalFlip(p=1.0)(s)
    assert torch.equal(f["semseg"], s["semseg"].flip(-1))
    assert torch.equal(f["normals"][0], -s["normals"][0].flip(-1))
    assert torch.equal(f["normals"][1:], s["normals"][1:].flip(-1))
    assert torch.equal(f["image"][0] * 2, f["semseg"].float())
    assert f["meta"] == s["meta"]


def test_scale_divides_depth_and_crop_pads_with_ignore():
    s = _toy_sample()
    out = T.RandomScale(scales=[2.0])(s)
    assert out["semseg"].shape == (12, 16) and out["semseg"].dtype == torch.int64
    assert torch.allclose(out["depth"][0, ::2, ::2], s["depth"][0] / 2)
    assert torch.equal(out["semseg"][::2, ::2], s["semseg"])
    crop = T.RandomCrop(20, generator=torch.Generator().manual_seed(0))(out)
    assert crop["image"].shape == (3, 20, 20) and crop["semseg"].shape == (20, 20)
    assert (crop["semseg"][12:] == 255).all() and (crop["depth"][:, :, 16:] == 0).all()
    assert (crop["normals"][:, 12:] == 0).all()
    small = T.RandomCrop((4, 4), generator=torch.Generator().manual_seed(1))(s)
    assert torch.equal(small["image"][0] * 2, small["semseg"].float())  # still aligned
    pipeline = T.train_transform(size=10)(s)
    assert pipeline["image"].shape == (3, 10, 10) and pipeline["depth"].shape == (1, 10, 10)


def test_resolve_data_root(data_root, monkeypatch, tmp_path):
    monkeypatch.delenv("SCENESSL_NYUD_ROOT", raising=False)
    with pytest.raises(FileNotFoundError) as error:
        resolve_data_root("nyud")
    message = str(error.value)
    assert "SCENESSL_NYUD_ROOT" in message and "gt_sets" in message and "embedded" in message
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        resolve_data_root("nyud", tmp_path)
    monkeypatch.setenv("SCENESSL_NYUD_ROOT", str(data_root / "nyud"))
    assert resolve_data_root("nyud") == data_root / "nyud"
    with pytest.raises(FileNotFoundError, match="pascal_context"):
        resolve_data_root("nyud", data_root / "pascal_context")  # explicit root wins, even when wrong
    with pytest.raises(KeyError, match="pascal_context"):
        build_dataset("no_such_dataset")
    assert set(DATASETS.names()) >= {"coco", "images", "classification", "pascal_context", "nyud", "davis2017", "voc2012"}
    monkeypatch.setattr("selfsup.data.synthetic.ensure_embedded_data", lambda *a, **k: data_root)
    assert resolve_data_root("voc2012", "embedded") == data_root / "voc2012"
    assert len(build_dataset("pascal_context", root="embedded", split="val")) == NUM - NUM // 2


def test_ensure_embedded_data_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("SCENESSL_DATA", str(tmp_path))
    root = ensure_embedded_data(size=24, num=4, seed=0, workers=1)
    from selfsup.data.synthetic import GENERATOR_VERSION
    assert root == tmp_path / f"embedded-v{GENERATOR_VERSION}-24-4-0" and (root / "voc2012" / "ImageSets").is_dir()
    stamp = (root / "embedded.json").stat().st_mtime_ns
    assert ensure_embedded_data(size=24, num=4, seed=0) == root  # reused, not regenerated
    assert (root / "embedded.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [f"embedded-v{GENERATOR_VERSION}-24-4-0"]  # no temporary folder left


def test_preview_grid(data_root, tmp_path):
    samples = [PascalContextMT(data_root / "pascal_context", split="val")[0], NYUDMT(data_root / "nyud")[0]]
    path = save_sample_grid(tmp_path / "grid.png", samples)
    grid = Image.open(path)
    assert grid.mode == "RGB" and grid.height >= 2 * SIZE


def test_make_data_cli(tmp_path):
    script = REPO / "launch" / "make_data.py"
    assert "--formats" in subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True).stdout
    subprocess.run([sys.executable, script, "--output-dir", tmp_path, "--size", "32", "--num", "4", "--workers", "1",
                    "--formats", "voc2012,coco"], check=True, capture_output=True)
    assert len(VOC2012Segmentation(tmp_path / "voc2012", split="train")) == 2


def test_ensure_embedded_data_one_format(tmp_path, monkeypatch):
    """formats=("classification",) generates only the class folders, in their own cache folder, same images."""
    monkeypatch.setenv("SCENESSL_DATA", str(tmp_path))
    from selfsup.data.synthetic import FORMAT_VERSIONS, GENERATOR_VERSION
    full = ensure_embedded_data(size=24, num=4, seed=0, workers=1)
    objects = ensure_embedded_data(size=24, num=4, seed=0, workers=1, formats=("classification",))
    assert full.name == f"embedded-v{GENERATOR_VERSION}-24-4-0"
    # a set is named after its newest format: a change to the COCO scenes keeps the object set's cache
    assert objects == tmp_path / f"objects-v{FORMAT_VERSIONS['classification']}-24-4-0"
    assert sorted(p.name for p in objects.iterdir() if p.is_dir()) == ["classification"]
    files = sorted(p.relative_to(objects) for p in objects.rglob("*.jpg"))
    assert files and files == sorted(p.relative_to(full) for p in (full / "classification").rglob("*.jpg"))
    assert all((objects / f).read_bytes() == (full / f).read_bytes() for f in files)
    with pytest.raises(ValueError, match="expected some of"):
        ensure_embedded_data(size=24, num=4, formats=("imagenet",))


def test_coco_scenes_hold_several_dominant_objects_of_the_object_classes():
    """The scene-centric premise (COCO-format pretraining images): 2-4 objects each covering a good part of the
    image, side by side, so that two half-image crops often show different objects; their classes vary."""
    from selfsup.data.scenes import render_scene
    from selfsup.data.synthetic import coco_scene

    counts, classes, left_right_differ = [], set(), 0
    for i in range(40):
        scene = coco_scene(0, i, 96)
        width = scene.width
        labels = render_scene(scene)
        ids, areas = np.unique(labels["object_id"], return_counts=True)
        big = [k for k, a in zip(ids, areas) if k > 0 and a >= 0.03 * labels["object_id"].size]
        counts.append(len(big))
        classes |= {scene.objects[k - 1].cls for k in big}
        # the dominant object of the left and of the right half
        halves = [labels["object_id"][:, :width // 2], labels["object_id"][:, width // 2:]]
        tops = [np.bincount(h[h > 0].ravel(), minlength=len(scene.objects) + 1).argmax() for h in halves]
        left_right_differ += tops[0] != tops[1]
    assert min(counts) >= 2 and np.mean(counts) >= 2.5, counts  # measured: 2-4, mean 2.8
    assert len(classes) >= 12 and left_right_differ >= 28, (classes, left_right_differ)  # measured: 20 classes, 34
