"""launch/gpu_check.sh (the prepared device run of issue 20): its CPU dry run, its arguments, the wheel install
for the device machine and the ``make gpu-wheels`` target that downloads those wheels."""
import json
import os
import re
import shutil
import stat
import subprocess

import pytest

from conftest import PYTHON, REPO, run_env

SCRIPT = REPO / "launch" / "gpu_check.sh"


def _run(args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          env=env or run_env(), timeout=timeout)


def test_help_prints_the_header_only():
    res = _run(["--help"])
    assert res.returncode == 0, res.stderr
    assert "--smoke" in res.stdout and "make gpu-wheels" in res.stdout
    assert all(line.startswith("#") for line in res.stdout.splitlines())


def test_unknown_argument_is_a_one_line_error():
    res = _run(["--fast"])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "gpu_check.sh: error: unknown argument '--fast' (expected --smoke or --help)"]


def _fake_python(tmp_path):
    """A stand-in interpreter: says kornia is missing, logs every pip call, fails everything else."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "PYTHONPATH=$PYTHONPATH ARGS=$*" >> {log}
case "$*" in
    *find_spec*) exit 1 ;;
    "-m pip install"*) exit 0 ;;
    *) exit 3 ;;
esac
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake, log


def test_missing_kornia_installs_the_carried_wheels(tmp_path):
    fake, log = _fake_python(tmp_path)
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "kornia-0.9.0-py3-none-any.whl").write_bytes(b"")
    env = dict(run_env(), PYTHON=str(fake), GPU_CHECK_WHEELS=str(wheels), OUT=str(tmp_path / "out"))
    res = _run(["--smoke"], env=env)
    calls = log.read_text().splitlines()
    pip = [c for c in calls if "ARGS=-m pip install" in c]
    assert len(pip) == 1, calls
    for flag in ("--no-index", f"--find-links {wheels}", "--no-deps", "--target ",
                 str(wheels / "kornia-0.9.0-py3-none-any.whl")):
        assert flag in pip[0]
    site = re.search(r"--target (\S+)", pip[0]).group(1)
    later = calls[calls.index(pip[0]) + 1:]
    assert later and all(f"PYTHONPATH={site}:" in c for c in later)  # every later step imports the wheels
    assert res.returncode == 1 and "could not generate the JPEGs" in res.stderr  # the fake fails the benchmarks


def test_missing_kornia_without_wheels_is_a_clear_error(tmp_path):
    fake, log = _fake_python(tmp_path)
    env = dict(run_env(), PYTHON=str(fake), GPU_CHECK_WHEELS=str(tmp_path / "none"), OUT=str(tmp_path / "out"))
    res = _run(["--smoke"], env=env)
    assert res.returncode == 1
    assert "make gpu-wheels" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "pip install" not in log.read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_wheels_downloads_the_pinned_wheels_for_the_device():
    res = subprocess.run(["make", "-n", "gpu-wheels"], cwd=REPO, capture_output=True, text=True, check=True)
    pins = re.findall(r"^(kornia|submitit)==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert {name for name, _ in pins} == {"kornia", "submitit"}
    cmd = " ".join(res.stdout.split())
    for name, version in pins:
        assert f" {name}=={version}" in cmd
    assert " kornia_rs==" in cmd
    for flag in ("pip download", "--no-deps", "--only-binary=:all:", "--python-version 3.12",
                 "--platform manylinux2014_x86_64", "-d .whl.part"):
        assert flag in cmd
    assert "mv .whl.part .whl" in cmd
    ignored = subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=REPO)
    assert ignored.returncode == 0, ".whl/ must be git-ignored (it travels with carry, not in the tree)"


@pytest.mark.slow
@pytest.mark.timeout(360)  # ~30 s CPU (mostly six interpreters importing torch), ~60 s wall on the loaded 2-core box
def test_smoke_dry_run_exercises_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(run_env(), PYTHON=PYTHON, OUT=str(out), OMP_NUM_THREADS="1")
    env.pop("GPU_CHECK_WHEELS", None)
    res = _run(["--smoke"], env=env, timeout=340)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for step in ("== 1. gpu tests", "== 2. pretraining", "== 3. multi-task", "== 4. summary"):
        assert step in res.stdout
    assert "skipping MTI-Net + torch.compile: smoke run" in res.stdout
    assert not (out / "mtl_compile.json").exists()
    for recipe in ("moco", "ours"):
        run = json.loads((out / f"pretrain_{recipe}.json").read_text())
        assert run["args"]["recipe"] == recipe and run["device"] == "CPU"
        for key in ("a_compute_ceiling", "b_end_to_end_gpu_aug", "c_end_to_end_cpu_aug"):
            assert run["results"][key] > 0
    mtl = json.loads((out / "mtl.json").read_text())
    assert {r["mode"] for r in mtl["results"] if r["arch"] == "mti_net"} == {"fp32", "bf16+channels_last"}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# gpu_check on CPU")
    assert "pretrain moco resnet_tiny b4: end-to-end / ceiling" in summary
    assert "pretrain ours resnet_tiny b4: end-to-end / torchvision-PIL" in summary
    assert "MTI-Net training (best mode)" in summary and "| gpu tests | exit 0 |" in summary
