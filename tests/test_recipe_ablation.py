"""launch/bench_recipe.py (downstream/recipe_ablation.py): the arms resolve to the paper's cumulative recipe, the
ablation runs every arm x seed through the demo chain, writes the table, JSON and curves, and a rerun resumes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfsup.config import ConfigError, load_config
from selfsup.moco.config import PretrainConfig
from downstream.demo_chain import repo_path
from downstream.recipe_ablation import ARMS, RecipeAblationConfig, arm_overrides, load_ablation_config, run_ablation

TINY_PRETRAIN = ["train.epochs=2", "optim.batch_size=32", "train.knn_every_epochs=1", "data.num_workers=0",
                 "moco.queue_size=128", "moco.knn_warmup_epochs=0", "train.checkpoint_every_steps=2"]
TINY_DEMO = ["probe_images=100", "data_num=50", "probe_epochs=3"]


def _resolved(arm: str, seed: int = 0) -> PretrainConfig:
    cfg = RecipeAblationConfig()
    return load_config(PretrainConfig, yaml_path=repo_path("configs/pretrain/demo_objects.yaml"),
                       overrides=arm_overrides(cfg, arm, seed))


def test_arms_add_one_ingredient_each_in_the_papers_order():
    base, multicrop, autoaug, knn = (_resolved(a) for a in ARMS)
    assert list(ARMS) == ["moco_v2", "multicrop", "autoaugment", "knn"]
    # MoCo-v2: two views, no AutoAugment, no kNN positives, the demo's momentum
    assert (base.augment.num_small, base.augment.auto_augment, base.moco.knn_k, base.moco.momentum) == (0, False, 0, 0.99)
    # + constrained multi-crop (small crops scaled to the 64 px views), m 0.995
    assert (multicrop.augment.num_small, multicrop.augment.small_size, multicrop.augment.constraint) == (4, 32, "overlap")
    assert (multicrop.augment.auto_augment, multicrop.moco.momentum, multicrop.moco.knn_k) == (False, 0.995, 0)
    # + Standard-or-AutoAugment, + kNN positives
    assert autoaug.augment.auto_augment and autoaug.augment.num_small == 4 and autoaug.moco.knn_k == 0
    assert knn.augment.auto_augment and knn.augment.num_small == 4 and (knn.moco.knn_k, knn.moco.knn_weight) == (20, 0.4)
    # the same budget for every arm; the seed is the pretraining seed
    budgets = {(c.train.epochs, c.optim.batch_size, c.optim.lr, c.data.embedded_num) for c in (base, multicrop, autoaug, knn)}
    assert len(budgets) == 1 and _resolved("knn", seed=3).train.seed == 3


@pytest.mark.parametrize("override, key", [("arms=[moco_v2,supervised]", "arms"), ("dataset=imagenet", "dataset"),
                                            ("steps=[pretrain]", "steps"), ("seeds=[]", "seeds")])
def test_bad_config_is_an_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_ablation_config(None, [override])


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~60 s on an idle 2-core machine
def test_ablation_runs_every_arm_and_seed_writes_the_table_and_resumes(tmp_path, _hermetic_data_cache, capsys):
    out = tmp_path / "ablation"
    cfg = load_ablation_config(None, [f"output_dir={out}", "arms=[moco_v2,knn]", "seeds=[0,1]", "steps=[probes]",
                                      f"pretrain_overrides=[{','.join(TINY_PRETRAIN)}]",
                                      f"demo_overrides=[{','.join(TINY_DEMO)}]"])
    summary = run_ablation(cfg)
    arms = summary["arms"]
    assert set(arms) == {"moco_v2", "knn", "random"}
    for arm in ("moco_v2", "knn"):
        assert arms[arm]["seeds"] == [0, 1]
        assert len(arms[arm]["rows"]["kNN probe"]["values"]) == 2 and "linear probe" in arms[arm]["rows"]
        assert [len(c) for c in arms[arm]["knn_monitor"]] == [3, 3]  # epochs 0, 1, 2
        assert arms[arm]["pretrain_seconds"]["mean"] > 0
    # the seeds are real: the two pretrainings of an arm differ
    ck = [out / "objects" / "knn" / f"s{s}" / "pretrain" / "checkpoint.pth" for s in (0, 1)]
    assert ck[0].read_bytes() != ck[1].read_bytes()
    run_cfg = (out / "objects" / "knn" / "s1" / "pretrain" / "config.yaml").read_text()
    assert "knn_k: 20" in run_cfg and "seed: 1" in run_cfg
    table = (out / "objects" / "ablation.md").read_text()
    assert "| MoCo-v2 | 0,1 |" in table and "| + kNN positives (full recipe) | 0,1 |" in table and "| random init |" in table
    assert json.loads((out / "objects" / "ablation.json").read_text())["dataset"] == "objects"
    assert (out / "objects" / "ablation.png").stat().st_size > 1000 and (out / "config.yaml").is_file()

    # a rerun reads every finished step back: no pretraining runs again
    stamps = [p.stat().st_mtime_ns for p in ck]
    capsys.readouterr()
    again = run_ablation(cfg)
    printed = capsys.readouterr().out
    assert "== pretrain:" not in printed and "== probes (pretrained): done before" in printed
    assert [p.stat().st_mtime_ns for p in ck] == stamps
    assert again["arms"]["knn"]["rows"] == arms["knn"]["rows"]

    # finished runs need no checkpoints: without any *.pth the folders are read back as they are
    weights = list(out.rglob("*.pth"))
    assert len(weights) >= 8  # per arm and seed: the pretraining checkpoint and the exported backbone
    for p in weights:
        p.unlink()
    capsys.readouterr()
    kept = run_ablation(cfg)
    printed = capsys.readouterr().out
    assert "== pretrain:" not in printed and "== export:" not in printed and not list(out.rglob("*.pth"))
    assert kept["arms"] == again["arms"] and kept["gains"] == again["gains"]


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~25 s on an idle 2-core machine
def test_scenes_pretrain_on_the_coco_format_scenes(tmp_path, _hermetic_data_cache):
    out = tmp_path / "scenes"
    cfg = load_ablation_config(None, [f"output_dir={out}", "dataset=scenes", "arms=[moco_v2]", "seeds=[0]", "steps=[]",
                                      "scene_images=40", f"pretrain_overrides=[{','.join(TINY_PRETRAIN)}]",
                                      f"demo_overrides=[{','.join(TINY_DEMO)}]"])
    summary = run_ablation(cfg)
    run = out / "scenes" / "moco_v2" / "s0" / "pretrain"
    resolved = load_config(PretrainConfig, yaml_path=run / "config.yaml")
    assert resolved.data.name == "coco" and Path(resolved.data.root).name == "coco"
    assert len(list(Path(resolved.data.root).rglob("*.jpg"))) == 40
    assert "classification" in resolved.data.knn_monitor_root  # the monitor reads the object set
    assert set(summary["arms"]) == {"moco_v2"} and len(summary["arms"]["moco_v2"]["knn_monitor"][0]) == 3


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~35 s on an idle 2-core machine
def test_vary_data_seed_gives_each_seed_its_data_and_the_demo_spread(tmp_path, _hermetic_data_cache):
    """vary_data_seed: seed s pretrains and is evaluated on data generated with seed s; the summary carries the
    demo's spread (per row, max - min over the seeds of MoCo-v2's gain over random init of the same seed) and
    prints it for demo.yaml."""
    out = tmp_path / "spread"
    cfg = load_ablation_config(None, [f"output_dir={out}", "arms=[moco_v2]", "seeds=[0,1]", "steps=[probes]",
                                      "vary_data_seed=true", f"pretrain_overrides=[{','.join(TINY_PRETRAIN)}]",
                                      f"demo_overrides=[{','.join(TINY_DEMO)},data_seed=5]"])
    summary = run_ablation(cfg)
    roots = []
    for s in (0, 1):
        run = out / "objects" / "moco_v2" / f"s{s}"
        assert f"data_seed: {s}\n" in (run / "demo_config.yaml").read_text()  # the seed wins over demo_overrides
        resolved = load_config(PretrainConfig, yaml_path=run / "pretrain" / "config.yaml")
        assert f"-100-{s}" in resolved.data.root  # the object set of this data seed (100 images)
        roots.append(resolved.data.root)
        assert f"data_seed: {s}\n" in (out / "objects" / "random" / f"s{s}" / "demo_config.yaml").read_text()
    assert roots[0] != roots[1]
    arms, spread = summary["arms"], summary["demo_spread"]
    for row in ("kNN probe", "linear probe"):  # the gain over random init of the same seed, paired by seed
        gains = [p - r for p, r in zip(arms["moco_v2"]["rows"][row]["values"], arms["random"]["rows"][row]["values"])]
        assert summary["gains"]["moco_v2"][row]["values"] == pytest.approx(gains)
        assert spread[row] == pytest.approx(max(gains) - min(gains))
        assert summary["value_spread"][row] == max(arms["moco_v2"]["rows"][row]["spread"], arms["random"]["rows"][row]["spread"])
    table = (out / "objects" / "ablation.md").read_text()
    assert "downstream seed and data seed = its pretraining seed" in table and "| MoCo-v2 | " in table.split("Gain over")[1]
    assert f"spread:\n  kNN probe: {spread['kNN probe']:.3g}\n" in table
