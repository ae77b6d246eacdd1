"""downstream/bench_balancers.py: the side-by-side step timing and the Δ_MTL comparison (tiny budgets)."""
import json

import pytest
import yaml

from downstream.bench_balancers import main, parse_args, parse_spec, spec_dir

TINY = ["model.backbone=resnet_tiny", "model.fpn_channels=16", "model.head_channels=16", "model.task_channels=8"]


def test_overhead_times_every_balancer_side_by_side(capsys):
    names = ["pcgrad", "fixed", "mgda_ub", "dtp", "uncertainty"]
    rows = main(["overhead", "--height", "32", "--width", "32", "--batch-size", "2", "--rounds", "2", "--steps", "1",
                 "--warmup", "2", "--balancers", *names, *TINY])
    assert [r["balancer"] for r in rows] == ["fixed", "pcgrad", "mgda_ub", "dtp", "uncertainty"]  # fixed first
    assert rows[0]["vs_fixed"] == 1.0
    for r in rows:
        assert 0 < r["ms_min"] <= r["ms_per_step"] <= r["ms_max"] and set(r["weights"]) == {"semseg", "depth"}
    # the balancers trained: dtp's weights left 1 after its KPIs came in, uncertainty's log σ² moved
    weights = {r["balancer"]: r["weights"] for r in rows}
    assert weights["fixed"] == {"semseg": 1.0, "depth": 1.0} and weights["dtp"]["semseg"] != 1.0
    assert weights["uncertainty"]["semseg"] != 1.0
    assert "| mgda_ub |" in capsys.readouterr().out


def test_cli_rejects_unknown_balancer_and_stray_arguments(capsys):
    with pytest.raises(SystemExit):
        parse_args(["overhead", "--balancers", "fixed", "gradnrom"])
    err = capsys.readouterr().err
    assert "gradnrom" in err and "known:" in err
    with pytest.raises(SystemExit):
        parse_args(["compare", "--jbos", "2"])
    assert parse_args(["compare", "--jobs", "2", "epochs=3", "--seeds", "1", "optim.lr=1e-3"]).overrides == \
        ["epochs=3", "optim.lr=1e-3"]


def test_compare_models_must_be_multi_task_configs(capsys):
    for bad in ("mti_nett", "single_task_depth"):
        with pytest.raises(SystemExit):
            parse_args(["compare", "--models", "mtl_baseline", bad])
        err = capsys.readouterr().err
        assert f"--models: no multi-task config configs/nyud/{{{bad}}}.yaml" in err and "mti_net" in err
    assert parse_args(["compare", "--models", "mti_net", "mtl_baseline"]).models == ["mtl_baseline", "mti_net"]


def test_balancer_specs_carry_parameters(capsys):
    """NAME:key=value[,...]: the same balancer with other parameters in one comparison, checked before any run."""
    args = parse_args(["compare", "--balancers", "cagrad:convention=libmtl,c=0.2", "fixed", "mgda_ub", "epochs=3"])
    assert args.balancers == ["fixed", "cagrad:convention=libmtl,c=0.2", "mgda_ub"] and args.overrides == ["epochs=3"]
    assert parse_spec("cagrad:convention=libmtl,c=0.2") == ("cagrad", {"convention": "libmtl", "c": 0.2})
    assert parse_spec("fixed") == ("fixed", {}) and spec_dir("cagrad:c=0,rescale=false") == "cagrad@c=0+rescale=false"
    for bad, message in (("cagrad:cc=1", "has no parameter cc"), ("mgda:convention=libmtl", "convention must be one of"),
                         ("cagrad:c", "expected NAME:key=value")):
        with pytest.raises(SystemExit):
            parse_args(["compare", "--balancers", bad])
        assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(400)  # ~50 s on an idle 2-core machine (4 finetune_mtl.py runs, 2 at a time)
def test_compare_runs_references_and_balancers_then_reuses_them(tmp_path, embedded_root):
    """Regression tasks (depth, normals): their metrics are never 0 after one step, so Δ_MTL is defined."""
    argv = ["compare", "--dataset", "nyud", "--tasks", "depth", "normals", "--seeds", "0", "--epochs", "1", "--jobs", "2", "--balancers", "dwa",
            "fixed", "--models", "mti_net", "mtl_baseline", "--output-dir", str(tmp_path), "--data-root", str(embedded_root / "nyud"),
            "max_iters_per_epoch=1", "data.max_val_images=4", *TINY]
    table = main(argv)
    root = tmp_path / "nyud"
    assert table["runs_started"] == 6 and [(r["model"], r["balancer"]) for r in table["balancers"]] == [
        ("mtl_baseline", "fixed"), ("mtl_baseline", "dwa"), ("mti_net", "fixed"), ("mti_net", "dwa")]  # baseline first
    reference = json.loads((root / "s0" / "single_task.json").read_text())
    assert set(reference) == {"depth", "normals"}  # both single-task runs recorded into the seed's file
    for row in table["balancers"]:
        folder = row["balancer"] if row["model"] == "mtl_baseline" else f"mti_net+{row['balancer']}"
        results = json.loads((root / "s0" / folder / "results.json").read_text())
        assert results["balancer"] == row["balancer"] and row["delta_mtl"] == [results["delta_mtl"]]
        assert yaml.safe_load((root / "s0" / folder / "config.yaml").read_text())["model"]["arch"] == row["model"]
        assert row["weights"] == results["balancer_weights"] and row["cpu_min"] > 0
    md = (root / "balancers.md").read_text()
    dwa, fixed = table["balancers"][1]["delta_mtl"][0], table["balancers"][0]["delta_mtl"][0]
    assert "| dwa | " in md and f"| {dwa:+.2f} | {dwa - fixed:+.2f} |" in md  # Δ_MTL, then paired with fixed
    mti = table["balancers"][2]["delta_mtl"][0]
    assert f"| mti_net fixed | " in md and f"| {mti:+.2f} | {mti - fixed:+.2f} |" in md  # paired with the baseline's
    assert (root / "balancers.png").stat().st_size > 0
    again = main(argv)  # every run finished: nothing is started again, the table is the same
    assert again["runs_started"] == 0 and again["balancers"] == table["balancers"]
