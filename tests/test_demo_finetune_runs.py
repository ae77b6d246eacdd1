"""launch/demo.py finetune_runs: several fine-tuning runs per arm, averaged (kept out of tests/test_demo.py, whose
worker also builds the shared 30-epoch MoCo run: the longest path of `make test`)."""
import json

import pytest

from downstream.demo_chain import Chain, load_demo_config, run_demo


@pytest.mark.timeout(300)
def test_finetune_runs_are_averaged_and_read_back(tmp_path):
    """finetune_runs=2: each arm fine-tunes with seeds seed and seed + 100 (folders finetune, finetune_s100), the
    NYUD rows are the mean of the two; a rerun with another finetune_runs reads the finished runs back."""
    tiny = ["epochs=1", "max_iters_per_epoch=2", "model.backbone=resnet_tiny", "model.fpn_channels=8",
            "model.head_channels=8", "model.task_channels=4", "data.num_workers=0", "data.max_train_images=4",
            "data.max_val_images=4", "data.batch_size=2", "progress=false"]
    args = [f"output_dir={tmp_path}", "steps=[finetune]", "seed=3", "data_num=50", "nyud_val_images=0", "threads=1",
            f"finetune_overrides=[{','.join(tiny)}]"]
    summary = run_demo(load_demo_config(None, args + ["finetune_runs=2"]))  # random init only: nothing pretrained
    runs = [json.loads((tmp_path / "random" / name).read_text()) for name in ("finetune.json", "finetune_s103.json")]
    assert [r["seed"] for r in runs] == [3, 103]
    depth = [r["metrics"]["depth"]["rmse"] for r in runs]
    assert depth[0] != depth[1]  # another seed: another run
    assert (tmp_path / "random" / "finetune_s103" / "checkpoint.pth").is_file()
    assert summary["rows"] == []  # (no pretrained arm to compare)
    both = Chain(load_demo_config(None, args + ["finetune_runs=2"])).finetune("random", "none")
    assert both["metrics"]["depth"]["rmse"] == pytest.approx(sum(depth) / 2) and len(both["runs"]) == 2
    one = Chain(load_demo_config(None, args + ["finetune_runs=1", "steps=[]"])).finetune("random", "none")
    assert one["metrics"]["depth"]["rmse"] == depth[0]  # read back, nothing run (steps=[])
    run_demo(load_demo_config(None, args + ["finetune_runs=1"]))  # accepted on the same dir (RERUN_KEYS)
