"""The published reading and evaluation conventions (SPEC §2, docs/mtl.md "Protocol"), on real files."""
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from selfsup.data import generate_datasets
from downstream.datasets import PascalContextMT
from downstream.datasets.pascal_context import PERSON_CLASS_IND, normals_valid_labels

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "downstream" / "datasets" / "reference"


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory) -> Path:
    root = generate_datasets(tmp_path_factory.mktemp("pascal"), size=48, num=12, seed=0, formats=["pascal_context"])
    return root / "pascal_context"


def _label_map(root: Path, sample_id: str) -> np.ndarray:
    return scipy.io.loadmat(root / "pascal-context" / "trainval" / f"{sample_id}.mat")["LabelMap"]


def _reference_seg2bmap(label: np.ndarray) -> np.ndarray:
    """seg2bmap at the map's own size, written out pixel by pixel (right, bottom, bottom-right neighbours)."""
    H, W = label.shape
    b = np.zeros((H, W), bool)
    for y in range(H):
        for x in range(W):
            for dy, dx in ((0, 1), (1, 0), (1, 1)):
                if y + dy < H and x + dx < W and label[y + dy, x + dx] != label[y, x]:
                    b[y, x] = True
    return b


def test_reference_files_are_the_published_lists():
    labels = (REFERENCE / "pascal_context_normals_valid_labels.tsv").read_text().splitlines()
    assert labels[0] == "label_id\tname" and len(normals_valid_labels()) == 170 == len(labels) - 1
    assert {440, 158, 284, 427} <= normals_valid_labels() and 2 not in normals_valid_labels()  # wall, floor, person, tv
    assert len((REFERENCE / "pascal_context_edge_test_ids.txt").read_text().split()) == 2498


@pytest.mark.timeout(120)
def test_pascal_labels_follow_the_published_reading(pascal_root):
    ds = PascalContextMT(pascal_root, split="train", tasks=["normals", "human_parts", "edge"])
    ds_val = PascalContextMT(pascal_root, split="val", tasks=["normals", "human_parts", "edge"])
    valid_ids = np.array(sorted(normals_valid_labels()))
    seen = {"invalid_label": 0, "only_unannotated_persons": 0, "mixed_persons": 0}
    for dataset in (ds, ds_val):
        for i, sample_id in enumerate(dataset.ids):
            s = dataset[i]
            label_map = _label_map(pascal_root, sample_id)
            # normals: valid exactly on the 170 NYU-compatible LabelMap ids (the PNG has normals everywhere)
            code = np.asarray(Image.open(pascal_root / "normals_distill" / f"{sample_id}.png"))
            assert code.any(-1).all()
            valid = s["normals"].norm(dim=0).numpy() > 0
            assert np.array_equal(valid, np.isin(label_map, valid_ids))
            seen["invalid_label"] += int((~valid).any())
            # human parts: only persons with part annotations define the map
            objects = scipy.io.loadmat(pascal_root / "human_parts" / f"{sample_id}.mat")["anno"][0, 0]["objects"].ravel()
            persons = [o for o in objects if int(np.squeeze(o["class_ind"])) == PERSON_CLASS_IND]
            annotated = [o for o in persons if o["parts"].size]
            parts = s["human_parts"].numpy()
            if not annotated:
                assert (parts == 255).all()
                seen["only_unannotated_persons"] += bool(persons)
            else:
                for o in persons:
                    if not o["parts"].size:  # a person without parts is background
                        assert (parts[np.asarray(o["mask"]) > 0] == 0).all()
                        seen["mixed_persons"] += 1
            # edges (training target and GT alike): bwmorph(seg2bmap(LabelMap), 'thin')
            from skimage.morphology import thin
            assert np.array_equal(s["edge"][0].numpy() > 0, thin(_reference_seg2bmap(label_map)))
    assert all(seen.values()), seen  # every rule is exercised by the written files


def test_saliency_empty_images_count_iou_one_and_miou_is_reported_both_ways():
    from downstream.mtl.metrics import SaliencyMeter

    meter = SaliencyMeter(thresholds=np.array([0.3, 0.7]))
    meter.update(torch.tensor([0.5, 0.1]), torch.tensor([0.0, 0.0]))  # t=0.3: IoU 0; t=0.7: empty/empty -> 1
    meter.update(torch.tensor([0.9, 0.5]), torch.tensor([1.0, 1.0]))  # t=0.3: IoU 1; t=0.7: IoU 1/2
    out = meter.compute()
    # mean P/R: t=0.3 (1/2, 1/2) -> F 1/2; t=0.7 (1/2, 1/4) -> F 1/3: best F at 0.3
    assert out["threshold"] == pytest.approx(0.3) and out["maxf"] == pytest.approx(50.0)
    assert out["miou"] == pytest.approx(50.0)  # at the best-F threshold
    assert out["miou_max"] == pytest.approx(75.0) and out["miou_max_threshold"] == pytest.approx(0.7)


def test_thinning_has_bwmorph_semantics():
    from selfsup.data.labels import seg2bmap, thin

    square = np.zeros((6, 6), bool)
    square[2:4, 2:4] = True  # bwmorph 'thin' keeps one pixel of a 2x2 block (Zhang-Suen deletes it)
    assert thin(square).sum() == 1
    bar = np.zeros((8, 8), bool)
    bar[1:7, 2:5] = True  # a 6x3 bar thins to its 4-pixel medial line, as MATLAB gives
    assert np.array_equal(np.argwhere(thin(bar)), [[2, 3], [3, 3], [4, 3], [5, 3]])
    diagonal = np.array([[1, 1], [1, 2]])  # at (0, 0) only the bottom-right neighbour differs
    assert seg2bmap(diagonal).tolist() == [[True, True], [True, False]]


def _reference_ods(probs, gts, tolerance=0.0075, thresholds=np.linspace(0.01, 0.99, 99)):
    """BSDS/SEISM ODS written independently: skimage thinning, maximum one-to-one matching within the
    tolerance disk by linear_sum_assignment (cost 0 inside the disk, 1 outside), counts summed over images."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist
    from skimage.morphology import thin

    matched, n_pred, n_gt = np.zeros(len(thresholds)), np.zeros(len(thresholds)), 0
    for prob, gt in zip(probs, gts):
        gt_xy = np.argwhere(gt)
        n_gt += len(gt_xy)
        radius = tolerance * np.hypot(*prob.shape)
        for k, t in enumerate(thresholds):
            pred_xy = np.argwhere(thin(prob > t))
            n_pred[k] += len(pred_xy)
            if len(pred_xy) and len(gt_xy):
                cost = (cdist(pred_xy, gt_xy) > radius).astype(float)
                rows, cols = linear_sum_assignment(cost)
                matched[k] += int((cost[rows, cols] == 0).sum())
    precision, recall = matched / np.maximum(n_pred, 1), matched / max(n_gt, 1)
    return 100 * float(np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12)))


@pytest.mark.timeout(120)
def test_edge_ods_agrees_with_an_independent_seism_implementation(pascal_root):
    from scipy.ndimage import gaussian_filter

    from downstream.mtl.edge_metric import EdgeMeter

    ds = PascalContextMT(pascal_root, split="val", tasks=["edge"])
    rng = np.random.default_rng(0)
    meter, probs, gts = EdgeMeter(tolerance=0.03), [], []
    for i in range(len(ds)):
        gt = ds[i]["edge"][0].numpy() > 0
        shifted = np.roll(gt, int(rng.integers(-1, 2)), axis=1).astype(float)
        # thick, blurred, noisy edge probabilities: thinning and the threshold both matter
        prob = np.clip(gaussian_filter(shifted, 1.2) * 2.5 + 0.25 * rng.random(gt.shape), 0, 1)
        meter.update(torch.from_numpy(prob), torch.from_numpy(gt.astype(np.float32)))
        probs.append(prob)
        gts.append(gt)
    ours = meter.compute()["odsf"]
    reference = _reference_ods(probs, gts, tolerance=0.03)
    assert 20 < reference < 100 and abs(ours - reference) <= 0.2, (ours, reference)


def test_edge_evaluation_ids(caplog):
    from downstream.mtl.config import EvalConfig
    from downstream.mtl.edge_metric import edge_eval_ids

    defaults = EvalConfig()  # SEISM: the test subset, 99 thresholds, matching within 0.0075 x diagonal
    assert (defaults.edge_ids, defaults.edge_thresholds, defaults.edge_tolerance) == ("seism", 99, 0.0075)

    seism = sorted((REFERENCE / "pascal_context_edge_test_ids.txt").read_text().split())
    real_val = seism[:3] + ["2008_999999"]
    assert edge_eval_ids("seism", dataset="pascal_context", val_ids=real_val) == frozenset(seism[:3])
    assert edge_eval_ids("all", dataset="pascal_context", val_ids=real_val) is None
    assert edge_eval_ids("seism", dataset="nyud", val_ids=["000001"]) is None
    with caplog.at_level("WARNING"):  # embedded data: no SEISM id, every val image is evaluated
        assert edge_eval_ids("seism", dataset="pascal_context", val_ids=["2008_000006"]) is None
    assert "SEISM" in caplog.text
    with pytest.raises(FileNotFoundError, match="edge_ids"):
        edge_eval_ids("no_such_file.txt", dataset="pascal_context", val_ids=real_val)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch,extra", [("mti_net", {}), ("mtl_baseline", dict(neck="none", head="aspp", output_stride=8,
                                                                               aspp_rates=(2, 4, 6))),
                                        ("astmt", {})])  # ASTMT: per-task SE blocks (global pooling)
def test_evaluation_does_not_depend_on_the_batch(pascal_root, arch, extra):
    from torch.utils.data import DataLoader

    from downstream.mtl.data import collate_padded
    from downstream.mtl.engine import evaluate
    from downstream.mtl.models import build_model
    from downstream.mtl.tasks import TaskSet
    from downstream.datasets.mt_transforms import eval_transform

    tasks = TaskSet("pascal_context", ("semseg", "sal", "normals"))
    ds = PascalContextMT(pascal_root, split="val", tasks=list(tasks.main), transform=eval_transform())
    assert len({ds[i]["meta"]["size"] for i in range(len(ds))}) > 1  # mixed sizes: batches are padded
    torch.manual_seed(0)
    kwargs = dict(backbone="resnet_tiny", fpn_channels=16, head_channels=16, task_channels=8, **extra)
    if arch == "astmt":
        from downstream.mtl.config import MTLConfig
        kwargs["astmt_options"] = MTLConfig().model.astmt
    model = build_model(arch, tasks=tasks, **kwargs)
    results = [evaluate(model, DataLoader(ds, batch_size=b, collate_fn=collate_padded), tasks=tasks.main,
                        num_outputs=tasks.channels(), device=torch.device("cpu"), progress=False) for b in (1, 4)]
    for task in tasks.main:
        for key, value in results[0][task].items():
            assert results[1][task][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (task, key)  # float rounding only


def test_rotation_turns_labels_and_normals_together():
    from downstream.datasets.mt_transforms import rotate_scale

    H = W = 6
    semseg = torch.arange(H * W).reshape(H, W) % 21
    normals = torch.zeros(3, H, W)
    normals[0] = 1.0  # every normal points right
    sample = {"image": torch.rand(3, H, W), "semseg": semseg, "normals": normals}
    out = rotate_scale(sample, 90.0, 1.0)  # counter-clockwise on screen
    assert torch.equal(out["semseg"], torch.rot90(semseg, 1, dims=(0, 1)))
    assert torch.allclose(out["normals"][:, 2, 3], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)  # now pointing up
    small = rotate_scale(sample, 0.0, 0.5)  # zoom out: the border comes from outside the image -> ignore / invalid
    assert (small["semseg"][0] == 255).all() and (small["normals"][:, 0] == 0).all()
    assert (small["semseg"][2:4, 2:4] != 255).all()


def test_pascal_configs_default_to_the_published_training_transforms(repo, pascal_root):
    from downstream.mtl.config import MTLConfig
    from downstream.mtl.data import build_datasets
    from selfsup.config import load_config
    from downstream.datasets import mt_transforms

    for path in sorted((repo / "configs" / "pascal").glob("*.yaml")):
        cfg = load_config(MTLConfig, yaml_path=path)
        assert (cfg.data.augment, tuple(cfg.data.crop_size)) == ("scale_rotate_resize", (512, 512)), path.name
        assert tuple(cfg.data.scale_range) == (0.75, 1.25) and cfg.data.rotation == 20.0
    cfg = load_config(MTLConfig, yaml_path=repo / "configs" / "pascal" / "mti_net.yaml",
                      updates={"data": {"crop_size": [40, 40], "tasks": ["semseg"], "root": str(pascal_root)}})
    train, _ = build_datasets(cfg.data)
    kinds = [type(t) for t in train.transform.transforms]
    assert kinds == [mt_transforms.RandomHorizontalFlip, mt_transforms.RandomScaleRotate, mt_transforms.Resize,
                     mt_transforms.Normalize]
    assert train[0]["image"].shape == (3, 40, 40)
    crop = mt_transforms.train_transform(40, augment="scale_crop")  # the previous recipe stays available
    assert [type(t) for t in crop.transforms][2] is mt_transforms.RandomCrop


@pytest.mark.timeout(120)
def test_published_model_sizes_reproduce_the_relative_costs():
    """MTI-Net / PAD-Net / MTL baseline params and FLOPs relative to the single-task set at the published setting
    (NYUD semseg + depth, HRNet-18, no neck) against the MTI-Net paper's table (which MTLP reports): MTI-Net +57%
    params / −13% FLOPs. Measured: +54.1% / −12.5%. Tolerance ±5 points: the paper rounds to whole percent, and
    the residual is counting detail, not widths (our distillation convs carry biases, the ST set is 7.87M vs the
    paper's 8.0M, i.e. −1.6% in the denominator alone); the released code's FPM (N·C/4) gives +9.0% and the narrow
    CPU widths (task_channels 64) −10.4%, so either would fail. ``widths=published`` is the default of every entry point
    (``ModelConfig.widths``)."""
    from downstream.mtl.bench import architecture_costs
    from downstream.mtl.config import ModelConfig
    assert ModelConfig().widths == "published" and ModelConfig().fpm_reduction == 0  # 0 = N*C at published widths
    from downstream.mtl.flops import relative_report
    from downstream.mtl.tasks import TaskSet

    tasks = TaskSet("nyud", ("semseg", "depth"))
    # relative params/FLOPs do not depend on the input size: 120x160 stands for 480x640 here (docs/mtl.md has both)
    costs = architecture_costs(["mtl_baseline", "pad_net", "mti_net"], tasks=tasks, backbone="hrnet18",
                               size=(120, 160), model_kwargs=dict(neck="none", widths="published"))
    single = {k: v for k, v in costs.items() if k.startswith("single_task")}
    assert abs(sum(c["params"] for c in single.values()) / 1e6 - 8.0) < 0.3  # paper: ST set 8.0M
    # MTI-Net: the FPM's f two residual blocks N*C wide (fpm_reduction 1); the released code's N*C/4 gives +9%/-23%
    paper = {"mtl_baseline": (-50, -45), "pad_net": (-15, 204), "mti_net": (57, -13)}
    for arch, (params, flops) in paper.items():
        r = relative_report(arch, costs[arch], single)
        assert abs(r["params_rel"] - params) <= 5 and abs(r["flops_rel"] - flops) <= 5, (arch, r)


def test_mti_net_published_widths_fpm_softmax_and_aspp():
    from downstream.mtl.layers import ASPP
    from downstream.mtl.models import build_model
    from downstream.mtl.mti_net import FeaturePropagation
    from downstream.mtl.tasks import TaskSet

    tasks = TaskSet("nyud", ("semseg", "depth"))
    model = build_model("mti_net", tasks=tasks, backbone="resnet_tiny", neck="none", widths="published")
    enc = model.encoder.channels
    widths = [block[-1].conv2.out_channels for block in (m["semseg"] for m in model.initial_features)]
    assert widths == enc and [p.reduce.conv2.out_channels for p in model.propagation] == enc[1:]
    # FPM stack: N*C wide by default (the paper's f and its cost table), N*C/4 with fpm_reduction=4 (released code)
    assert [p.non_linear[0].conv2.out_channels for p in model.propagation] == [2 * c for c in enc[1:]]
    code = build_model("mti_net", tasks=tasks, backbone="resnet_tiny", neck="none", widths="published", fpm_reduction=4)
    assert [p.non_linear[0].conv2.out_channels for p in code.propagation] == [2 * c // 4 for c in enc[1:]]
    narrow = build_model("mti_net", tasks=tasks, backbone="resnet_tiny", neck="none", widths="narrow", task_channels=8)
    assert [p.non_linear[0].conv2.out_channels for p in narrow.propagation] == [8, 8, 8]  # max(C, N*C/4), as before
    with pytest.raises(ValueError, match="fpm_reduction"):
        build_model("mti_net", tasks=tasks, backbone="resnet_tiny", neck="none", fpm_reduction=-1)
    from downstream.mtl.config import MTLConfig
    from selfsup.config import ConfigError, load_config
    assert load_config(MTLConfig, updates={"model": {"fpm_reduction": 4}}).model.fpm_reduction == 4
    with pytest.raises(ConfigError, match="model.fpm_reduction"):
        load_config(MTLConfig, updates={"model": {"fpm_reduction": -1}})
    torch.manual_seed(0)
    fpm = FeaturePropagation(tasks=("a", "b"), channels=4, softmax="task").eval()
    published = FeaturePropagation(tasks=("a", "b"), channels=4, softmax="published").eval()
    published.load_state_dict(fpm.state_dict())
    feats = {"a": torch.randn(1, 4, 5, 5), "b": torch.randn(1, 4, 5, 5)}
    assert not torch.allclose(fpm(feats)["a"], published(feats)["a"])
    with pytest.raises(ValueError, match="fpm_softmax"):
        FeaturePropagation(tasks=("a", "b"), channels=4, softmax="channel")
    aspp = ASPP(8, 8, (1, 2, 3))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in aspp.pool)
    assert isinstance(aspp.project[-1], torch.nn.Dropout) and aspp.project[-1].p == 0.5


def test_knn_warmup_defaults_follow_the_run_length():
    from selfsup.config import load_config
    from selfsup.moco.config import PretrainConfig, knn_warmup_epochs

    for epochs, expected in ((100, 5), (200, 5), (201, 20), (800, 20)):
        cfg = load_config(PretrainConfig, updates={"train": {"epochs": epochs}})
        assert knn_warmup_epochs(cfg.moco.knn_warmup_epochs, cfg.train.epochs) == expected
    assert knn_warmup_epochs(3, 800) == 3  # an explicit value wins
    # whichever way the epochs are given: YAML, --epochs, key=value (the default -1 resolves at run time)
    from conftest import entry_module
    cli = entry_module("launch/pretrain.py")
    from selfsup.moco.config import flags_to_updates

    given = {"yaml": dict(yaml_path=REPO / "configs" / "pretrain" / "moco_coco_800ep.yaml"),
             "flag": dict(updates=flags_to_updates(cli.parse_args(["--epochs", "800"]))),
             "key=value": dict(overrides=["train.epochs=800"])}
    for way, kwargs in given.items():
        cfg = load_config(PretrainConfig, **kwargs)
        assert knn_warmup_epochs(cfg.moco.knn_warmup_epochs, cfg.train.epochs) == 20, way
    cfg = load_config(PretrainConfig, updates=flags_to_updates(cli.parse_args(["--epochs", "800", "--knn-warmup-epochs", "0"])))
    assert knn_warmup_epochs(cfg.moco.knn_warmup_epochs, cfg.train.epochs) == 0
