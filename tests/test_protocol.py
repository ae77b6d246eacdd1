"""The published reading and evaluation conventions (SPEC §2, docs/mtl.md "Protocol"), on real files."""
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from selfsup.data import PascalContextMT, generate_datasets
from selfsup.data.pascal_context import PERSON_CLASS_IND, normals_valid_labels

REFERENCE = Path(__file__).resolve().parents[1] / "ssl" / "data" / "reference"


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
