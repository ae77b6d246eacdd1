"""MoCo core: queue, momentum update, loss, shuffle-BN, DDP queue agreement, resume, NaN guard."""
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn import functional as F

from conftest import TINY_PRETRAIN
from selfsup import checkpoint as ckpt
from selfsup.config import load_config
from selfsup.moco import model as moco_model
from selfsup.moco.config import PretrainConfig
from selfsup.moco.contrastive import instance_loss
from selfsup.moco.model import MoCo
from selfsup.moco.loop import run_pretraining


def tiny_moco(**kw):
    args = dict(arch="resnet_tiny", hidden_dim=32, dim=8, queue_size=12)
    args.update(kw)
    return MoCo(**args)


def test_queue_fifo_and_pointer_wrap():
    m = tiny_moco()
    assert int(m.queue_ptr) == 0
    batches = [torch.full((4, 8), float(i)) for i in range(4)]
    for b in batches[:3]:
        m.enqueue(b)
    assert int(m.queue_ptr) == 0  # 12 / 4: wrapped
    assert torch.equal(m.key_queue[:4], batches[0]) and torch.equal(m.key_queue[8:], batches[2])
    m.enqueue(batches[3])  # oldest entries are replaced first
    assert torch.equal(m.key_queue[:4], batches[3]) and torch.equal(m.key_queue[4:8], batches[1])
    assert int(m.queue_ptr) == 4 and int(m.num_enqueued) == 16
    with pytest.raises(ValueError, match="divisible"):
        m.enqueue(torch.zeros(5, 8))


def test_momentum_update_math():
    m = tiny_moco()
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    q = [p.clone() for p in m.encoder_q.parameters()]
    k = [p.clone() for p in m.encoder_k.parameters()]
    m.momentum_update(0.9)
    for pq, pk, new in zip(q, k, m.encoder_k.parameters()):
        assert torch.allclose(new, 0.9 * pk + 0.1 * pq, atol=1e-6)
    assert all(not p.requires_grad for p in m.encoder_k.parameters())


def test_instance_loss_hand_computed():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    k = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=1)
    queue = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    tau = 0.2
    expected = 0.0
    for i in range(2):
        pos = float(q[i] @ k[i])
        negs = [float(q[i] @ n) for n in queue]
        logits = [pos / tau] + [n / tau for n in negs]
        expected += -(logits[0] - math.log(sum(math.exp(v) for v in logits)))
    loss, stats = instance_loss(q, k, queue, temperature=tau)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)
    assert stats["logit_pos"].item() == pytest.approx((0.8 + 0.8) / 2, rel=1e-5)


def test_head_bn_centres_random_init_embeddings():
    """Without BN in the MLP, random-init projections of different images point the same way (ReLU'd pooled
    features are all positive), which stalls short MoCo runs; ``head_bn`` centres them."""
    torch.manual_seed(0)
    x = torch.rand(32, 3, 64, 64)
    mean_cos = {}
    for head_bn in (False, True):
        m = tiny_moco(hidden_dim=128, dim=32, head_bn=head_bn)
        assert any(isinstance(layer, torch.nn.BatchNorm1d) for layer in m.encoder_q.head) == head_bn
        _, z = m.encoder_q([x])
        z = F.normalize(z, dim=1)
        mean_cos[head_bn] = (z @ z.t())[~torch.eye(32, dtype=torch.bool)].mean().item()
    assert mean_cos[False] > 0.6 and mean_cos[True] < 0.5 * mean_cos[False], mean_cos


def test_shuffle_bn_keeps_key_order():
    torch.manual_seed(0)
    m = tiny_moco(shuffle_bn_groups=4)
    x = torch.randn(8, 3, 32, 32)
    m.encoder_k.eval()  # running statistics: the result must not depend on the shuffle
    g, k = m.encode_keys(x, torch.Generator().manual_seed(1))
    g_ref, k_ref = m.encoder_k([x])
    assert torch.allclose(k, F.normalize(k_ref, dim=1), atol=1e-5)
    assert torch.allclose(g, F.normalize(g_ref, dim=1), atol=1e-5)
    m.encoder_k.train()  # train mode: each group has its own BN statistics -> differs from one batch
    _, k_grouped = m.encode_keys(x, torch.Generator().manual_seed(1))
    _, k_whole = m.encoder_k([x])
    assert not torch.allclose(k_grouped, F.normalize(k_whole, dim=1), atol=1e-3)


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from selfsup.distributed import cleanup, init_distributed
    init_distributed(device_type="cpu")
    torch.manual_seed(0)  # same init on every rank
    m = tiny_moco(queue_size=16)
    torch.manual_seed(100 + rank)  # different data per rank
    for step in range(3):
        views = [torch.randn(2, 3, 32, 32) for _ in range(2)]
        out, (keys, gkeys) = m(views, momentum=0.99, generator=torch.Generator().manual_seed(step))
        assert keys.shape[0] == 4  # gathered from both ranks
        m.enqueue(keys, gkeys)
    torch.save({"queue": m.key_queue.clone(), "ptr": int(m.queue_ptr)}, os.path.join(out_dir, f"rank{rank}.pt"))
    cleanup()


def test_ddp_two_processes_same_queue(tmp_path):
    from selfsup.launcher import free_port
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["ptr"] == r1["ptr"] == 12
    assert torch.equal(r0["queue"], r1["queue"])
    assert not torch.equal(r0["queue"][:4], r0["queue"][4:8])


def _cfg(out, *extra):
    return load_config(PretrainConfig, overrides=TINY_PRETRAIN + [f"output_dir={out}", "data.knn_monitor=none"] + list(extra))


@pytest.mark.parametrize("variant", [[], ["optim.name=adamw", "optim.lr=0.004", "model.head_bn=true"]],
                         ids=["sgd", "adamw_head_bn"])
def test_resume_is_bit_exact(tmp_path, embedded_root, variant):
    common = ["train.epochs=2", "train.steps_per_epoch=4", "train.checkpoint_every_steps=100", *variant]
    run_pretraining(_cfg(tmp_path / "full", *common))
    stopped = run_pretraining(_cfg(tmp_path / "resumed", *common, "train.max_steps=3"))  # "killed" mid-epoch 0
    assert stopped["global_step"] == 3
    partial = ckpt.load_checkpoint(tmp_path / "resumed" / "checkpoint.pth")
    assert partial["global_step"] == 3 and partial["step_in_epoch"] == 3
    run_pretraining(_cfg(tmp_path / "resumed", *common))  # same command again: resumes
    a = ckpt.load_checkpoint(tmp_path / "full" / "checkpoint.pth")
    b = ckpt.load_checkpoint(tmp_path / "resumed" / "checkpoint.pth")
    assert a["global_step"] == b["global_step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_nan_loss_stops_with_last_checkpoint_intact(tmp_path, embedded_root, monkeypatch):
    calls = {"n": 0}
    real = moco_model.instance_loss

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 3 else loss), stats

    monkeypatch.setattr(moco_model, "instance_loss", poisoned)
    cfg = _cfg(tmp_path, "train.epochs=3", "train.steps_per_epoch=4", "train.checkpoint_every_steps=2")
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* epoch 0, step 3"):
        run_pretraining(cfg)
    state = ckpt.load_checkpoint(tmp_path / "checkpoint.pth")
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_knn_monitor_and_tensorboard_written(tmp_path, embedded_root):
    cfg = load_config(PretrainConfig, overrides=TINY_PRETRAIN + [f"output_dir={tmp_path}", "train.epochs=1",
                                                                 "train.steps_per_epoch=2"])
    result = run_pretraining(cfg)
    assert [h["epoch"] for h in result["knn"]] == [0, 1]
    assert all(0.0 <= h["knn_acc"] <= 100.0 for h in result["knn"])
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert (tmp_path / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/logit_pos", "train/logit_neg", "train/queue_fill",
            "train/images_per_s", "train/data_time_fraction", "monitor/knn_acc"} <= tags


def test_corrupt_image_is_skipped_and_counted(tmp_path, embedded_root):
    import shutil
    folder = tmp_path / "images"
    folder.mkdir()
    for src in sorted((embedded_root / "coco").rglob("*.jpg"))[:31]:
        shutil.copy(src, folder / src.name)
    (folder / "000_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    cfg = load_config(PretrainConfig, overrides=TINY_PRETRAIN + [
        f"output_dir={tmp_path / 'run'}", f"data.name={folder}", "data.knn_monitor=none", "train.epochs=1"])
    result = run_pretraining(cfg)
    assert result["skipped_images"] == 1
    assert result["global_step"] == 2  # 32 files, batch 16: every file is read once


TINY_FLAGS = ["--backbone", "resnet_tiny", "--batch-size", "16", "--workers", "0", "--epochs", "1",
              "model.hidden_dim=64", "moco.queue_size=64", "train.steps_per_epoch=2", "augment.large_size=32",
              "augment.small_size=16", "data.knn_monitor=none"]


@pytest.mark.parametrize("extra", [["--multicrop", "--num-small", "2", "--knn", "4", "--knn-warmup-epochs", "0"],
                                   ["--gpus", "2"]], ids=["recipe", "ddp2"])
def test_pretrain_cli_smoke_and_export(tmp_path, repo, embedded_root, extra):
    import subprocess
    from conftest import PYTHON, run_env
    out = tmp_path / "run"
    res = subprocess.run([PYTHON, str(repo / "launch" / "pretrain.py"), *TINY_FLAGS, *extra, "--output-dir", str(out)],
                         capture_output=True, text=True, env=run_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    state = ckpt.load_checkpoint(out / "checkpoint.pth")
    assert state["global_step"] == 2 and (out / "config.yaml").is_file()
    if "--knn" in extra:
        assert state["config"]["moco"]["knn_k"] == 4 and state["model"]["backbone_queue"].shape[0] == 64
        assert state["config"]["augment"]["num_small"] == 2
        from selfsup.exporters import export_backbone  # a real run's checkpoint exports resumable for main_ours.py
        moco = torch.load(export_backbone(out / "checkpoint.pth", fmt="moco", out=tmp_path / "m.pth.tar", optimizer=True),
                          weights_only=True)
        assert moco["state_dict"]["module.queue_backbone"].shape == state["model"]["backbone_queue"].t().shape
        assert len(moco["optimizer"]["state"]) == len(state["optimizer"]["state"]) > 0
    else:
        assert (out / "log_rank1.txt").is_file()  # the second process ran
    res = subprocess.run([PYTHON, str(repo / "launch" / "export.py"), "--weights", str(out / "checkpoint.pth"), "--format",
                          "detectron2", "--out", str(tmp_path / "d2.pkl")], capture_output=True, text=True, env=run_env())
    assert res.returncode == 0 and (tmp_path / "d2.pkl").is_file(), res.stderr


@pytest.mark.parametrize("bad, message", [(["optim.lrr=3"], "optim.lrr"), (["optim.name=lamb"], "optim.name"),
                                          (["--backbone", "resnet5"], "resnet50"),
                                          (["--data", "coco"], "SCENESSL_COCO_ROOT")])
def test_pretrain_cli_bad_input_is_one_clear_error(tmp_path, repo, bad, message, monkeypatch):
    """In this process, through run_main (what ``python launch/pretrain.py`` runs: the SystemExit's one line goes to
    stderr with exit status 1; a real subprocess's line: test_faults.py, the full-disk tests)."""
    from conftest import entry_module
    from selfsup.cli import run_main

    monkeypatch.delenv("SCENESSL_COCO_ROOT", raising=False)
    monkeypatch.delenv("SCENESSL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        run_main(entry_module("launch/pretrain.py").main, ["--output-dir", str(tmp_path / "run"), *bad])
    line = str(exc.value.code)
    assert line.startswith("error: ") and message in line and "\n" not in line, line
    assert not (tmp_path / "run").exists()  # rejected before the run dir is made


def test_moco_step_with_hrnet_backbone():
    """Any registered backbone pretrains: one MoCo step with HRNet-18 gives a finite loss and backbone gradients."""
    torch.manual_seed(0)
    m = MoCo(arch="hrnet18", hidden_dim=32, dim=8, queue_size=16, shuffle_bn_groups=2)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    out, (keys, _) = m(views, momentum=0.99)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and keys.shape == (4, 8)
    assert all(p.grad is not None for p in m.encoder_q.backbone.parameters())


def test_symmetric_loss_is_the_mean_of_both_directions():
    """moco.symmetric: crop 1 is also a query with crop 0's key as positive; only crop 1's keys are enqueued."""
    torch.manual_seed(0)
    m = tiny_moco(symmetric=True).eval()  # eval: BN uses running statistics, so grouping does not matter
    a, b = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out, (keys, _) = m([a, b], momentum=1.0)  # momentum 1: the key encoder does not change
    m.symmetric = False
    ab, (keys_ab, _) = m([a, b], momentum=1.0)
    ba, _ = m([b, a], momentum=1.0)
    assert out["loss"].item() == pytest.approx((ab["loss"].item() + ba["loss"].item()) / 2, rel=1e-5)
    assert torch.allclose(keys, keys_ab, atol=1e-6) and keys.shape == (4, 8)


def test_pretraining_on_the_embedded_object_images(embedded_root):
    """``data.name=classification data.root=embedded``: the train split of the embedded classification images."""
    from selfsup.moco.config import DataConfig, PretrainConfig
    from selfsup.moco.pipeline import pretrain_files

    files = pretrain_files(PretrainConfig(data=DataConfig(name="classification", root="embedded", embedded_num=200)))
    # only the classification format is generated for it (an ``objects-*`` cache folder): the same images as the
    # classification part of the whole embedded set, under another folder
    train = embedded_root / "classification" / "train"
    expected = sorted(str(p.relative_to(train)) for p in train.rglob("*.jpg"))
    got = sorted(str(Path(f).relative_to(Path(f).parents[1])) for f in files)
    assert got == expected and len(files) == 200
    assert all(Path(f).parts[-3] == "train" and Path(f).parents[3].name.startswith("objects-") for f in files)
    first = sorted(files)[0]
    assert Path(first).read_bytes() == (train / Path(first).relative_to(Path(first).parents[1])).read_bytes()
