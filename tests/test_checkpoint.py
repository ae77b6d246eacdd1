import os
import pickle
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import torchvision

from conftest import PYTHON, run_env
from selfsup import checkpoint as ckpt
from selfsup.backbones import build_backbone
from selfsup.exporters import detectron2_name, export_backbone
from selfsup.moco.model import MoCo


def _moco_checkpoint(path):
    model = MoCo(arch="resnet_tiny", hidden_dim=32, dim=16, queue_size=64)
    state = {"epoch": 3, "step_in_epoch": 0, "global_step": 30, "arch": "resnet_tiny", "model": model.state_dict()}
    ckpt.save_checkpoint(state, path)
    return model


def test_atomic_save_survives_kill_during_save(tmp_path):
    path = tmp_path / "checkpoint.pth"
    ckpt.save_checkpoint({"version": 0, "w": torch.zeros(10)}, path)
    writer = f"""
import torch, sys
sys.path.insert(0, {str(tmp_path)!r})
from selfsup.checkpoint import save_checkpoint
big = torch.randn(64, 1024, 1024)  # 256 MiB: each save takes a while
i = 1
while True:
    save_checkpoint({{'version': i, 'w': big}}, {str(path)!r})
    i += 1
"""
    proc = subprocess.Popen([PYTHON, "-c", writer], env=run_env())
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
            time.sleep(0.01)
        assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), "writer never started a save"
        proc.send_signal(signal.SIGKILL)  # killed in the middle of writing
        proc.wait()
    finally:
        proc.kill()
    state = ckpt.load_checkpoint(path)  # the last complete checkpoint still loads
    assert state["version"] >= 0


class _Requeued(Exception):
    """What a preemption handler raises (submitit's requeues the job, then exits)."""


def _write_with_signals(path, *signums):
    """atomic_write of b'new' * 1000 that sends itself ``signums`` after the first half."""
    def write(f):
        f.write(b"new" * 500)
        for signum in signums:
            os.kill(os.getpid(), signum)
            time.sleep(0.01)  # (the handler runs at the next bytecode)
        f.write(b"new" * 500)
    return ckpt.atomic_write(path, write)


@pytest.fixture
def requeue_handler():
    """SIGUSR1 -> raise _Requeued (as submitit's handler raises SystemExit); the old handler back afterwards."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)
        raise _Requeued(signum)
    old = signal.signal(signal.SIGUSR1, handler)
    yield handler, calls
    signal.signal(signal.SIGUSR1, old)


def test_a_preemption_signal_mid_write_is_handled_after_the_rename(tmp_path, requeue_handler):
    """The signal waits for the write: the new file is complete and in place when the handler runs."""
    handler, calls = requeue_handler
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"old")
    with pytest.raises(_Requeued):
        _write_with_signals(path, signal.SIGUSR1)
    assert calls == [signal.SIGUSR1]
    assert path.read_bytes() == b"new" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
    assert signal.getsignal(signal.SIGUSR1) is handler  # the handler is back


def test_a_second_signal_mid_write_is_handled_at_once(tmp_path, requeue_handler):
    """Two signals of one kind: no more waiting; the write stops and the previous file is intact."""
    handler, calls = requeue_handler
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"old")
    with pytest.raises(_Requeued):
        _write_with_signals(path, signal.SIGUSR1, signal.SIGUSR1)
    assert calls == [signal.SIGUSR1]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
    assert signal.getsignal(signal.SIGUSR1) is handler


def test_sigterm_mid_save_ends_the_process_after_the_save(tmp_path):
    """SIGTERM with its default action during torch.save: the process ends once the new checkpoint is in place."""
    path = tmp_path / "checkpoint.pth"
    ckpt.save_checkpoint({"version": 0}, path)
    code = f"""
import os, signal, torch
from selfsup import checkpoint as ckpt

real = ckpt._CheckedWriter.write
def write(self, data):
    if self.written > 0 and not getattr(self, 'sent', False):
        self.sent = True
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, data)
ckpt._CheckedWriter.write = write
ckpt.save_checkpoint({{'version': 1, 'w': torch.randn(100000)}}, {str(path)!r})
print('not reached')
"""
    proc = subprocess.run([PYTHON, "-c", code], env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
    assert "not reached" not in proc.stdout
    assert ckpt.load_checkpoint(path)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


@pytest.mark.parametrize("prefix", ["", "module.", "backbone.", "module.encoder_q.", "encoder_q.backbone.",
                                    "module.encoder_q.backbone."])
def test_prefix_tolerant_backbone_load(prefix):
    src = build_backbone("resnet_tiny")
    state = {prefix + k: v for k, v in src.state_dict().items()}
    state[prefix + "fc.weight"] = torch.zeros(3, 128)
    if "encoder_q" in prefix:
        state["module.encoder_k.conv1.weight"] = torch.zeros(1)  # key encoder is ignored
        state["module.queue"] = torch.zeros(16, 8)
    dst = build_backbone("resnet_tiny")
    ckpt.load_backbone_weights(dst, {"state_dict": state})
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_mismatch_lists_missing_and_unexpected(tmp_path):
    state = build_backbone("resnet_tiny").state_dict()
    state.pop("layer4.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"missing keys: layer4\.0\.conv1\.weight.*unexpected keys: extra\.weight"):
        ckpt.load_backbone_weights(build_backbone("resnet_tiny"), tmp_path / "bad.pth")
    with pytest.raises(ckpt.CheckpointMismatchError, match="shape"):
        ckpt.load_backbone_weights(build_backbone("resnet18"), {"model": build_backbone("resnet_tiny").state_dict()})


def test_torchvision_export_loads_in_torchvision(tmp_path):
    model = MoCo(arch="resnet50", hidden_dim=64, dim=16, queue_size=32)
    ckpt.save_checkpoint({"epoch": 1, "arch": "resnet50", "model": model.state_dict()}, tmp_path / "c.pth")
    out = export_backbone(tmp_path / "c.pth", fmt="torchvision", out=tmp_path / "tv.pth")
    net = torchvision.models.resnet50()
    missing, unexpected = net.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert torch.equal(net.conv1.weight, model.encoder_q.backbone.conv1.weight)


def test_moco_export_round_trip(tmp_path):
    model = _moco_checkpoint(tmp_path / "c.pth")
    out = export_backbone(tmp_path / "c.pth", fmt="moco", out=tmp_path / "moco.pth.tar")
    official = torch.load(out, weights_only=True)
    assert set(official) >= {"epoch", "arch", "state_dict", "optimizer"}
    sd = official["state_dict"]
    assert "module.encoder_q.conv1.weight" in sd and "module.encoder_q.fc.0.weight" in sd and "module.queue" in sd
    assert sd["module.queue"].shape == (16, 64)  # official layout [dim, K]
    net = build_backbone("resnet_tiny")
    ckpt.load_backbone_weights(net, out)  # official MoCo layout loads into our backbone
    assert torch.equal(net.conv1.weight, model.encoder_q.backbone.conv1.weight)


def test_detectron2_export_names(tmp_path):
    _moco_checkpoint(tmp_path / "c.pth")
    out = export_backbone(tmp_path / "c.pth", fmt="detectron2", out=tmp_path / "d2.pkl")
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert data["matching_heuristics"] is True and "__author__" in data
    names = set(data["model"])
    assert {"stem.conv1.weight", "stem.conv1.norm.running_mean", "res2.0.conv1.weight", "res2.0.conv2.norm.bias",
            "res3.0.shortcut.weight", "res3.0.shortcut.norm.running_var", "res5.0.conv2.norm.weight"} <= names
    assert all(isinstance(v, np.ndarray) for v in data["model"].values())
    assert not any(n.startswith("layer") or "bn" in n or "downsample" in n for n in names)
    assert detectron2_name("layer4.2.bn3.weight") == "res5.2.conv3.norm.weight"


def test_export_cli(tmp_path, repo):
    _moco_checkpoint(tmp_path / "c.pth")
    res = subprocess.run([PYTHON, str(repo / "launch" / "export.py"), "--weights", str(tmp_path / "c.pth"), "--format",
                          "torchvision", "--out", str(tmp_path / "x.pth")], capture_output=True, text=True, env=run_env())
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "x.pth").is_file()


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3))
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


class Evil:
    pass


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_checkpoint(tmp_path / "evil.pth")
