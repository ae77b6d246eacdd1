"""The official-MoCo export: a file main_moco.py (and the improved-recipe code) can resume from; every export
format loads back through the --weights loader."""
import logging
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import TINY_PRETRAIN, entry_module
from selfsup import checkpoint as ckpt
from selfsup import exporters as export
from selfsup.backbones import build_backbone
from selfsup.config import load_config
from selfsup.moco.config import PretrainConfig
from selfsup.moco.loop import StepState, _checkpoint_state, build_model, build_optimizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint after one real SGD step of a tiny kNN-positives run (epoch 0 done: 1 step per epoch)."""
    torch.manual_seed(0)
    cfg = load_config(PretrainConfig, overrides=TINY_PRETRAIN + ["moco.knn_k=4", "train.steps_per_epoch=1"])
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(cfg.optim, model.encoder_q.parameters(), lr=0.05)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    out, (keys, backbone_keys) = model(views, momentum=cfg.moco.momentum, use_knn=True)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    model.enqueue(keys, backbone_keys)
    path = tmp_path_factory.mktemp("export") / "checkpoint.pth"
    state = _checkpoint_state(cfg, model, optimizer, StepState(epoch=1, step_in_epoch=0, global_step=1))
    ckpt.save_checkpoint(state, path)
    return {"cfg": cfg, "model": model, "optimizer": optimizer, "path": path, "state": state}


class OfficialMoCo(nn.Module):
    """moco.builder.MoCo's structure (mlp=True) around our backbone, as main_moco.py builds it; ``queue_backbone``
    as the improved-recipe code registers it."""

    def __init__(self, *, arch: str, hidden_dim: int, dim: int, queue_size: int) -> None:
        super().__init__()
        for name in ("encoder_q", "encoder_k"):
            encoder = build_backbone(arch)
            encoder.fc = nn.Sequential(nn.Linear(encoder.num_features, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))
            setattr(self, name, encoder)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", torch.randn(dim, queue_size))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_backbone", torch.randn(self.encoder_q.num_features, queue_size))


def _official_key(ours: str) -> str:  # our encoder_q parameter name -> the DDP-wrapped official model's
    return "module.encoder_q." + (ours.replace("head.", "fc.", 1) if ours.startswith("head.") else ours[len("backbone."):])


def test_moco_export_resumes_in_the_official_layout(run, tmp_path):
    cfg, model = run["cfg"], run["model"]
    out = export.export_backbone(run["path"], fmt="moco", out=tmp_path / "moco.pth.tar", optimizer=True)
    exported = torch.load(out, weights_only=True)
    assert set(exported) == {"epoch", "arch", "state_dict", "optimizer"}
    assert exported["epoch"] == 1 and exported["arch"] == "resnet_tiny"  # main_moco.py saves epoch + 1 after epoch 0
    sd = exported["state_dict"]
    K, C = cfg.moco.queue_size, model.encoder_q.backbone.num_features
    assert sd["module.queue"].shape == (cfg.model.dim, K) and sd["module.queue_ptr"].tolist() == [8]
    assert sd["module.queue_backbone"].shape == (C, K)
    assert torch.equal(sd["module.queue_backbone"], model.backbone_queue.t())

    official = OfficialMoCo(arch="resnet_tiny", hidden_dim=cfg.model.hidden_dim, dim=cfg.model.dim, queue_size=K)
    ddp = nn.Module()
    ddp.module = official  # DistributedDataParallel's `module.` prefix
    ddp.load_state_dict(sd, strict=True)
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)  # main_moco.py's optimizer
    sgd.load_state_dict(exported["optimizer"])
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, cfg.optim.momentum, cfg.optim.weight_decay)
    ours = {name: run["optimizer"].state[p]["momentum_buffer"] for name, p in model.encoder_q.named_parameters()}
    params = dict(ddp.named_parameters())
    for name, buf in ours.items():
        assert torch.equal(sgd.state[params[_official_key(name)]]["momentum_buffer"], buf), name
    assert not any(params[n] in sgd.state for n in params if n.startswith("module.encoder_k."))  # no grad, no buffer
    assert len(sgd.state) == len(ours) and len(group["params"]) == 2 * len(ours)


def test_official_parameter_order_is_torchvision_resnet50_order():
    """The renumbering assumes main_moco.py's encoder (torchvision resnet50, fc -> MLP) orders its parameters
    as our encoder does."""
    ours = [export._official_name("encoder_q", n) for n, _ in export._query_parameters({"model": {"arch": "resnet50"}})]
    with torch.device("meta"):
        net = torchvision.models.resnet50(num_classes=128)
        net.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), net.fc)
    assert ours == ["module.encoder_q." + n for n, _ in net.named_parameters()]


def test_moco_export_without_what_the_optimizer_needs(run, tmp_path, caplog):
    state = dict(run["state"])
    state.pop("config")
    ckpt.save_checkpoint(state, tmp_path / "noconfig.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"no 'config'.*--no-optimizer"):
        export.export_backbone(tmp_path / "noconfig.pth", fmt="moco", out=tmp_path / "a.pth.tar", optimizer=True)
    with caplog.at_level(logging.WARNING, logger="selfsup.exporters"):
        out = export.export_backbone(tmp_path / "noconfig.pth", fmt="moco", out=tmp_path / "b.pth.tar")
    assert torch.load(out, weights_only=True)["optimizer"] == {} and "optimizer state not exported" in caplog.text
    query_only = dict(run["state"], model={k: v for k, v in run["state"]["model"].items() if k.startswith("encoder_q.")})
    ckpt.save_checkpoint(query_only, tmp_path / "query_only.pth")
    with pytest.raises(ckpt.CheckpointError, match="not a training checkpoint"):
        export.export_backbone(tmp_path / "query_only.pth", fmt="moco", out=tmp_path / "q.pth.tar", optimizer=True)
    adamw = dict(run["state"], config={**run["state"]["config"], "optim": {"name": "adamw"}})
    ckpt.save_checkpoint(adamw, tmp_path / "adamw.pth")
    with pytest.raises(ckpt.CheckpointError, match="optim.name=adamw"):
        export.export_backbone(tmp_path / "adamw.pth", fmt="moco", out=tmp_path / "c.pth.tar", optimizer=True)
    assert export.export_backbone(run["path"], fmt="moco", out=tmp_path / "d.pth.tar", optimizer=False) and \
        torch.load(tmp_path / "d.pth.tar", weights_only=True)["optimizer"] == {}

    cli = entry_module("launch/export.py")
    with pytest.raises(SystemExit) as err:
        cli.main(["--weights", str(tmp_path / "noconfig.pth"), "--format", "moco", "--out", str(tmp_path / "e.pth.tar"), "--optimizer"])
    message = str(err.value.code)
    assert message.startswith("error: ") and "no 'config'" in message and "\n" not in message


# ---------------------------------------------------------------- round trips through the --weights loader

def _random_backbone_checkpoint(path):
    """A checkpoint of a randomly initialised tiny MoCo model whose BN statistics are random too (so a loader
    that left running_mean/var at their defaults would fail)."""
    from selfsup.moco.model import MoCo
    torch.manual_seed(3)
    model = MoCo(arch="resnet_tiny", hidden_dim=32, dim=16, queue_size=64)
    for name, buf in model.encoder_q.backbone.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            buf.copy_(torch.rand_like(buf) + 0.5)
        elif name.endswith("num_batches_tracked"):
            buf.fill_(7)
    ckpt.save_checkpoint({"epoch": 1, "arch": "resnet_tiny", "model": model.state_dict()}, path)
    return model.encoder_q.backbone.state_dict()


@pytest.mark.parametrize("fmt,suffix", [("torchvision", ".pth"), ("detectron2", ".pkl"), ("moco", ".pth.tar")])
def test_every_export_format_loads_back_through_weights(fmt, suffix, tmp_path):
    """Export -> the loader every --weights uses (selfsup.checkpoint.load_backbone_weights, behind the evaluation
    protocols' frozen_backbone and the MTL trainers) -> every tensor equal to the source backbone's."""
    from frozen.features import frozen_backbone
    source = _random_backbone_checkpoint(tmp_path / "c.pth")
    out = export.export_backbone(tmp_path / "c.pth", fmt=fmt, out=tmp_path / f"exported{suffix}",
                                 **({"optimizer": False} if fmt == "moco" else {}))
    mtl = build_backbone("resnet_tiny")
    result = ckpt.load_backbone_weights(mtl, out)  # strict: raises on any missing/unexpected key
    assert result == {"missing": [], "unexpected": []}
    frozen = frozen_backbone("resnet_tiny", str(out), device=torch.device("cpu"))
    skipped = {"detectron2": {k for k in source if k.endswith("num_batches_tracked")}}.get(fmt, set())
    for net in (mtl, frozen):
        loaded = net.state_dict()
        for name, value in source.items():
            if name not in skipped:  # detectron2 files carry no BN step counters
                assert torch.equal(loaded[name], value), f"{fmt}: {name}"
    assert fmt != "detectron2" or skipped and all(loaded[k].item() == 0 for k in skipped)


def test_detectron2_reader_names_and_refusals(tmp_path):
    assert ckpt.torchvision_name("stem.conv1.norm.running_var") == "bn1.running_var"
    assert ckpt.torchvision_name("res5.2.conv3.norm.weight") == "layer4.2.bn3.weight"
    assert ckpt.torchvision_name("res3.0.shortcut.norm.bias") == "layer2.0.downsample.1.bias"
    assert ckpt.torchvision_name("res3.0.shortcut.weight") == "layer2.0.downsample.0.weight"
    for name in build_backbone("resnet_tiny").state_dict():
        assert ckpt.torchvision_name(export.detectron2_name(name)) == name
    # MoCo's converter layout inside a full detectron2 model: only backbone.bottom_up.* is the backbone
    full = {"model": {"backbone.bottom_up.stem.conv1.weight": np.ones((2, 3, 1, 1), np.float32),
                      "roi_heads.box_predictor.cls_score.weight": np.zeros((3, 4), np.float32)}}
    with open(tmp_path / "full.pkl", "wb") as f:
        pickle.dump(full, f)
    assert list(ckpt.load_detectron2_weights(tmp_path / "full.pkl")) == ["conv1.weight"]

    class Payload:  # a global outside numpy's array reconstruction: never imported, never called
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": Payload()}}, f)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"evil\.pkl.*refused global (posix|os)\.system") as err:
        ckpt.load_backbone_weights(build_backbone("resnet_tiny"), tmp_path / "evil.pkl")
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04not a pickle")
    (tmp_path / "tensors.pkl").write_bytes(pickle.dumps({"model": {"stem.conv1.weight": np.array(["a"])}}))
    for bad, message in (("junk.pkl", "not a readable pickle|truncated"), ("tensors.pkl", "dtype <U1")):
        with pytest.raises(ckpt.CheckpointError, match=message) as err:
            ckpt.load_backbone_weights(build_backbone("resnet_tiny"), tmp_path / bad)
        assert bad in str(err.value) and "\n" not in str(err.value)
