"""The official-MoCo export: a file main_moco.py (and the improved-recipe code) can resume from."""
import importlib.util
import logging

import pytest
import torch
import torchvision
from torch import nn

from conftest import REPO, TINY_PRETRAIN
from selfsup import checkpoint as ckpt
from selfsup import export
from selfsup.backbones import build_backbone
from selfsup.config import load_config
from selfsup.moco.config import PretrainConfig
from selfsup.moco.train import StepState, _checkpoint_state, build_model, build_optimizer


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
    with caplog.at_level(logging.WARNING, logger="selfsup.export"):
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

    spec = importlib.util.spec_from_file_location("export_cli", REPO / "launch" / "export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as err:
        cli.main([str(tmp_path / "noconfig.pth"), "--format", "moco", "--out", str(tmp_path / "e.pth.tar"), "--optimizer"])
    message = str(err.value.code)
    assert message.startswith("error: ") and "no 'config'" in message and "\n" not in message
