"""Real faults, not simulated ones (issue 31): a full disk (a real small tmpfs), kill -9 of a run whose data
loader has workers followed by an immediate rerun, SIGTERM/SIGUSR1 preemption mid-epoch, a rejected config.

Each entry point runs as a subprocess where the fault is about the process (its exit code, its last line, what
it leaves on disk); docs/reliability.md lists the fault classes, what each loses, and the test here.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import PYTHON, REPO
from selfsup import checkpoint as ckpt
from selfsup.rundir import pid_alive
from test_reliability import MTL_TINY, PRETRAIN, pretrain_main, write_images

pytestmark = pytest.mark.timeout(300)  # (setup included: embedded data, the reference runs)


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(script, *args, timeout=120):
    return subprocess.run([PYTHON, str(REPO / script), *map(str, args)], capture_output=True, text=True, env=env(),
                          timeout=timeout)


def one_line_error(proc):
    """The process failed with one ``error: ...`` line as its last stderr line, and no traceback."""
    assert proc.returncode not in (0, None), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr[-2000:]
    return line


def mtl_args(root, out, *extra):
    return ["--data-root", root / "nyud", "--output-dir", out, *MTL_TINY, *extra]


# ---------------------------------------------------------------- a real full disk

@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MB tmpfs (needs root / CAP_SYS_ADMIN; skipped with the reason otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True,
                                 text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no 'mount' command: a real full disk (a small tmpfs) cannot be made here")
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs for a real full disk: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def fill(disk, leave):
    """Fill ``disk`` up to ``leave`` free bytes (tmpfs allocates the pages: the space is really gone)."""
    st = os.statvfs(disk)
    with open(disk / f"filler{len(list(disk.glob('filler*')))}", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def assert_full_disk_line(line, path, *, previous):
    assert line.startswith(f"error: could not write checkpoint {path}: no space left on device in {path.parent} ("), line
    kept = f"the previous checkpoint {path} is intact" if previous else "no previous checkpoint existed"
    assert line.endswith(kept), line
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))  # no temporary file left


def test_full_disk_in_pretraining_and_export_keeps_the_last_checkpoint(tmp_path, small_disk):
    """Pretraining's next checkpoint does not fit beside its last one: one line, the last one loads; then an export
    onto the same full disk (torchvision's .pth, detectron2's .pkl): one line, no file and no temporary left."""
    run = small_disk / "run"
    pretrain_main(run, "train.epochs=3", "train.max_steps=1", images=tmp_path / "images")  # one step, checkpointed
    size = (run / "checkpoint.pth").stat().st_size
    fill(small_disk, leave=size // 2)
    proc = run_script("launch/pretrain.py", "--data", tmp_path / "images", *PRETRAIN, "train.epochs=3",
                      "--output-dir", run)
    assert_full_disk_line(one_line_error(proc), run / "checkpoint.pth", previous=True)
    state = torch.load(run / "checkpoint.pth", weights_only=True)
    assert state["global_step"] == 1

    fill(small_disk, leave=8192)  # (a backbone is smaller than the checkpoint)
    out = small_disk / "backbone.pth"
    proc = run_script("launch/export.py", run / "checkpoint.pth", "--format", "torchvision", "--out", out)
    assert_full_disk_line(one_line_error(proc), out, previous=False)
    assert not out.exists()
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import export
    finally:
        sys.path.remove(str(REPO / "launch"))
    with pytest.raises(SystemExit) as exc:  # detectron2's pickle goes through the same checked, atomic write
        export.main([str(run / "checkpoint.pth"), "--format", "detectron2", "--out", str(small_disk / "d2.pkl")])
    assert_full_disk_line(str(exc.value), small_disk / "d2.pkl", previous=False)
    assert not (small_disk / "d2.pkl").exists()


def test_full_disk_in_finetuning_keeps_the_last_checkpoint(tmp_path, small_disk, embedded_root):
    from downstream.finetune_mtl import main
    run = small_disk / "mtl"
    main([str(a) for a in mtl_args(embedded_root, run, "epochs=1", "max_iters_per_epoch=1")])
    size = (run / "checkpoint.pth").stat().st_size
    fill(small_disk, leave=size // 2)
    proc = run_script("downstream/finetune_mtl.py", *mtl_args(embedded_root, run, "epochs=2", "max_iters_per_epoch=1"),
                      "--allow-config-change")
    assert_full_disk_line(one_line_error(proc), run / "checkpoint.pth", previous=True)
    state = torch.load(run / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 1


# ---------------------------------------------------------------- kill -9, then an immediate rerun

def children(pid):
    out = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(stat))
            except (OSError, ValueError, IndexError):
                pass
    return out


def wait_for(predicate, proc, what, timeout=90):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def test_kill_9_with_loader_workers_then_an_immediate_rerun_resumes(tmp_path, caplog):
    """The main process of a run whose loader has 2 workers is killed (SIGKILL) right after a checkpoint; the
    workers outlive it for seconds. The rerun started at once takes the dir over (a log line naming the dead
    pid) and resumes from the checkpoint, instead of 'in use by another run (pid <the dead pid>)'."""
    run, images = tmp_path / "run", write_images(tmp_path / "images")
    proc = subprocess.Popen([PYTHON, str(REPO / "launch" / "pretrain.py"), "--data", str(images), *PRETRAIN,
                             "train.epochs=50", "data.num_workers=2", "--output-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    try:
        wait_for(lambda: (run / "checkpoint.pth").is_file() and children(proc.pid), proc, "checkpoint and workers")
        workers, inode = children(proc.pid), (run / ".lock").stat().st_ino
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert any(pid_alive(w) for w in workers)  # the fault: the loader workers outlive the killed process
        step = torch.load(run / "checkpoint.pth", weights_only=True)["global_step"]
        pretrain_main(run, "train.epochs=50", f"train.max_steps={step + 1}", images=images)
    finally:
        proc.kill()
        proc.wait()
    assert torch.load(run / "checkpoint.pth", weights_only=True)["global_step"] == step + 1  # resumed, not restarted
    log = (run / "log_rank0.txt").read_text()
    assert f"took over output_dir={run} from pid {proc.pid} on host {os.uname().nodename}, which is no longer running" \
        in log
    assert f"resumed from {run}/checkpoint.pth" in log
    assert (run / ".lock").stat().st_ino == inode  # the lock was free: the workers did not hold it (no file swap)


def test_a_dead_runs_lock_still_held_by_its_child_is_taken_over(tmp_path, caplog):
    """The named holder died, but a process it forked still holds the lock file (a descriptor kept by anything
    it started): the dir is taken over at once, with a log line (a live holder is still refused:
    test_reliability.py::test_second_run_on_a_locked_dir_fails_at_once_naming_pid_and_host)."""
    import logging
    from selfsup.rundir import open_run_dir
    run = tmp_path / "run"
    code = ("import fcntl, os, socket, sys, time; os.mkdir(sys.argv[1]); fd = os.open(sys.argv[1] + '/.lock', "
            "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
            "os.write(fd, f'pid {os.getpid()} on host {socket.gethostname()} since now'.encode())\n"
            "child = os.fork()\nif child == 0:\n    time.sleep(60)\n    os._exit(0)\nprint(child, flush=True)")
    owner = subprocess.Popen([PYTHON, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=env())
    orphan = int(owner.stdout.readline())
    try:
        owner.wait()
        assert pid_alive(orphan)
        with caplog.at_level(logging.WARNING, logger="selfsup.rundir"):
            with open_run_dir(run, {}, harmless=()) as opened:
                opened.log_changes()
                assert f"pid {os.getpid()} " in (run / ".lock").read_text()
        assert f"took over output_dir={run} from pid {owner.pid} on host" in caplog.text
    finally:
        os.kill(orphan, signal.SIGKILL)


# ---------------------------------------------------------------- a rejected config writes nothing

@pytest.mark.parametrize("bad", [["moco.queue_size=36"], ["optim.batch_size=16", "moco.queue_size=32"]])
def test_rejected_pretraining_config_creates_no_run_dir(tmp_path, bad):
    """A queue the batch does not divide, a batch larger than the data: no run dir, lock, log or config.yaml."""
    with pytest.raises(SystemExit, match=r"^error: "):
        pretrain_main(tmp_path / "runs" / "run", *bad, images=tmp_path / "images")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("bad", [["--weights", "{tmp}/missing.pth"], ["optim.optimizer=adamx"]])
def test_rejected_finetuning_config_creates_no_run_dir(tmp_path, embedded_root, bad):
    from downstream.finetune_mtl import main
    with pytest.raises((SystemExit, ValueError), match=r"missing\.pth|adamx"):
        main([str(a).format(tmp=tmp_path) for a in mtl_args(embedded_root, tmp_path / "runs" / "mtl", *bad)])
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- mid-epoch checkpoints and preemption

MTL_MID = ["epochs=2", "max_iters_per_epoch=8", "data.max_train_images=16", "checkpoint_every_steps=0"]  # 8 steps an epoch
PRETRAIN_MID = ["train.epochs=2", "train.steps_per_epoch=4"]  # with 32 images: 4 steps per epoch, 8 in all


def same_threads_env():
    """The interrupted half runs in a subprocess, the reference and the resumed half here: same thread count."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def assert_same_state(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")


def assert_same_run(a, b, keys):
    a, b = (torch.load(p / "checkpoint.pth", weights_only=True) for p in (a, b))
    for key in keys:
        assert_same_state(a[key], b[key], key)


@pytest.fixture(scope="module")
def mtl_reference(tmp_path_factory, embedded_root):
    from downstream.finetune_mtl import main
    out = tmp_path_factory.mktemp("mtl_reference") / "run"
    main([str(a) for a in mtl_args(embedded_root, out, *MTL_MID)])
    return out


@pytest.fixture(scope="module")
def pretrain_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain_reference")
    images = write_images(tmp / "images", n=32)
    pretrain_main(tmp / "run", *PRETRAIN_MID, images=images)
    return tmp / "run", images


def start(script, *args):
    return subprocess.Popen([PYTHON, str(REPO / script), *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=same_threads_env())


def wait_for_stderr(proc, text, timeout=120):
    """Read the process's stderr (progress bars) until ``text`` appears; return what was read."""
    import select
    seen, deadline = b"", time.monotonic() + timeout
    while text.encode() not in seen:
        assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")[-2000:]
        if select.select([proc.stderr], [], [], 0.5)[0]:
            seen += os.read(proc.stderr.fileno(), 65536)
    return seen


def test_finetuning_killed_after_a_mid_epoch_checkpoint_resumes_bit_exactly(tmp_path, embedded_root, mtl_reference):
    """checkpoint_every_steps=1: kill -9 once the first mid-epoch checkpoint is written; the same command again
    resumes inside the epoch and ends with every model, optimizer and balancer tensor equal to the uninterrupted
    run's (the data order and draws are a function of seed, epoch and index; the RNG state is restored once the
    epoch's loader iterator exists)."""
    from downstream.finetune_mtl import main
    run = tmp_path / "run"
    args = mtl_args(embedded_root, run, *MTL_MID, "checkpoint_every_steps=1")
    proc = start("downstream/finetune_mtl.py", *args)
    try:
        wait_for(lambda: (run / "checkpoint.pth").is_file(), proc, "a mid-epoch checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    killed = torch.load(run / "checkpoint.pth", weights_only=True)
    assert killed["epoch"] == 0 and 0 < killed["step_in_epoch"] < 8 and killed["step"] == killed["step_in_epoch"]
    main([str(a) for a in args])  # the same command again
    assert f"at epoch 0, after {killed['step_in_epoch']} of its 8 steps" in (run / "log_rank0.txt").read_text()
    assert_same_run(mtl_reference, run, ["model", "optimizer", "balancer", "step", "epoch"])


def preempt(script, args, sig, bar):
    """Run ``script`` and send it ``sig`` once its progress bar shows ``bar``: (return code, stderr, its last
    line, the checkpoint). Epoch 0's bar is drawn (``0/N``) once the handlers are in place, so the run stops after
    the step in flight; not ``1/N``: at ~30 steps/s tqdm (0.1 s between redraws) may draw no step before the end."""
    proc = start(script, *args)
    try:
        wait_for_stderr(proc, bar)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    err = err.decode()
    return proc.returncode, err, err.strip().splitlines()[-1], torch.load(args[args.index("--output-dir") + 1] /
                                                                          "checkpoint.pth", weights_only=True)


def test_finetuning_preempted_mid_epoch_saves_that_step_and_resumes_bit_exactly(tmp_path, embedded_root,
                                                                                 mtl_reference):
    """SIGTERM mid-epoch (no periodic checkpoint: checkpoint_every_steps=0): the run writes a checkpoint
    at the current step, exits 75 with one line naming the signal, the step and the checkpoint; rerun, it ends
    equal to the uninterrupted run."""
    from downstream.finetune_mtl import main
    run = tmp_path / "run"
    args = mtl_args(embedded_root, run, *MTL_MID, "progress=true")
    code, err, line, state = preempt("downstream/finetune_mtl.py", args, signal.SIGTERM, "0/8")
    assert code == 75 and "Traceback" not in err, err[-2000:]
    assert line == (f"preempted by SIGTERM at epoch 0, step {state['step_in_epoch']} of 8 (global step "
                    f"{state['step']}): checkpoint saved to {run}/checkpoint.pth; run the same command again to "
                    f"resume from this step (exit code 75)"), line
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < 8
    main([str(a) for a in args])
    assert_same_run(mtl_reference, run, ["model", "optimizer", "balancer", "step", "epoch"])


def test_pretraining_preempted_mid_epoch_saves_that_step_and_resumes_bit_exactly(tmp_path, pretrain_reference):
    """The same for pretraining, with SIGUSR1 (the other signal; train.checkpoint_every_steps=1000 never falls in
    this run)."""
    reference, images = pretrain_reference
    run = tmp_path / "run"
    args = ["--data", images, *PRETRAIN, *PRETRAIN_MID, "--output-dir", run]
    code, err, line, state = preempt("launch/pretrain.py", args, signal.SIGUSR1, "0/4")
    assert code == 75 and "Traceback" not in err, err[-2000:]
    assert line == (f"preempted by SIGUSR1 at epoch 0, step {state['step_in_epoch']} (global step "
                    f"{state['global_step']}): checkpoint saved to {run}/checkpoint.pth; run the same command again "
                    f"to resume from this step (exit code 75)"), line
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < 4
    pretrain_main(run, *PRETRAIN_MID, images=images)
    assert_same_run(reference, run, ["model", "optimizer", "global_step", "epoch"])
