"""The run directory of a training run: one writer at a time, and a resume only under the same config.

:func:`open_run_dir` is what a training set-up calls on the writing process (rank 0) before it writes
anything into ``output_dir``:

1. create the folder (an ``output_dir`` below a regular file is a :class:`ConfigError` naming both);
2. take an exclusive ``fcntl.flock`` on ``<output_dir>/.lock`` and write the holder's pid and host into it.
   A second run on the same folder fails at once naming that pid and host. The lock belongs to the process
   that owns the run: forked children (data loader workers) close their inherited copy and exec'd ones never
   get it (``O_CLOEXEC``), so the kernel drops the lock the moment that process dies (kill -9, node reboot,
   preemption). A lock file still naming a dead process of this host is taken over at once, with a log line,
   even if something that process started still holds the old file; a requeued SLURM job simply continues;
3. remove temporary files of saves that were killed half-way (``.checkpoint.pth.*.tmp``);
4. compare the new resolved config with the one in the checkpoint it would resume from
   (:func:`check_resume_config`): keys that change the trajectory or the model are an error listing each
   key with its old and new value, unless ``allow_config_change`` is set; harmless keys (logging, progress,
   workers, checkpoint frequency, ... see each config's ``HARMLESS_KEYS``) are accepted and logged.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from selfsup.config import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
Change = Tuple[str, Any, Any]  # (dotted key, checkpoint value, new value)


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory; the message names its pid and host."""


class RunDir:
    """An open, locked run directory; :meth:`close` (or the end of a ``with`` block) releases the lock."""

    def __init__(self, path: Path, fd: Optional[int], changes: List[Change]) -> None:
        self.path, self._fd, self.accepted_changes = path, fd, changes

    def log_changes(self) -> None:
        """Log a takeover from a dead run and the accepted config changes (once logging writes into the run dir)."""
        dead = _TAKEN_OVER.pop(str(self.path.resolve()), None)
        if dead is not None:
            logger.warning("took over output_dir=%s from %s, which is no longer running", self.path, dead)
        for key, old, new in self.accepted_changes:
            logger.info("config change on resume accepted: %s: %r -> %r", key, old, new)

    def close(self) -> None:
        if self._fd is not None:
            _HELD.pop(str(self.path.resolve()), None)
            _TAKEN_OVER.pop(str(self.path.resolve()), None)
            os.ftruncate(self._fd, 0)  # a run that ended names no holder (a killed one still does)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_run_dir(path: Union[str, Path]) -> Path:
    """``mkdir -p`` with a one-line :class:`ConfigError` when a parent is a regular file or not writable."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise ConfigError(f"output_dir={path}: {blocker} is a file, not a folder") from None
    except PermissionError:
        raise ConfigError(f"output_dir={path}: no permission to create this folder") from None
    return path


# run dirs this process holds (resolved path -> lock descriptor): the lock is per process, so a run that ended
# with an exception in this process (a test, a notebook) can be started again here; other processes still wait
_HELD: Dict[str, int] = {}
# what open_run_dir took over from a dead run, per held path (logged by RunDir.log_changes)
_TAKEN_OVER: Dict[str, str] = {}


def _drop_inherited_locks() -> None:
    """In a forked child (data loader workers, pools): close the inherited lock descriptors.

    A flock belongs to the open file description, which fork shares: a worker that kept the descriptor would
    keep the run dir locked after the run's own process died (kill -9), until the worker noticed and exited.
    Closing (never unlocking: that would release the parent's lock too) leaves the parent the only holder.
    O_CLOEXEC does the same for exec'd children."""
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()
    _TAKEN_OVER.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _holder(text: str) -> Tuple[Optional[int], str]:
    """(pid, host) from a lock file's ``pid N on host H since ...``; (None, "") if unreadable."""
    m = re.match(r"pid (\d+) on host (\S+)", text)
    return (int(m.group(1)), m.group(2)) if m else (None, "")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a zombie counts as dead: its locks are gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _dead_owner(text: str) -> Optional[str]:
    """``pid N on host H`` when the lock text names a process of this host that is no longer running."""
    pid, host = _holder(text)
    if pid is None or host != socket.gethostname() or pid == os.getpid() or pid_alive(pid):
        return None
    return f"pid {pid} on host {host}"


def _open_locked(lock: Path) -> Tuple[Optional[int], str]:
    """Open ``lock`` and try to flock it: (fd, "") when locked and still the file at ``lock``, else (None,
    the holder's text). A file replaced by a takeover while we waited is retried."""
    for _ in range(10):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            text = os.pread(fd, 512, 0).decode(errors="replace").strip()
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                return None, text
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, os.pread(fd, 512, 0).decode(errors="replace").strip()
        os.close(fd)  # a takeover replaced the file after we opened it: lock the new one
    raise RuntimeError(f"{lock}: the lock file keeps being replaced")


def lock_run_dir(path: Path) -> int:
    """Take the exclusive lock of run dir ``path``; return its descriptor (keep it open while writing).

    The lock is this process's alone: forked children close their copy (:func:`_drop_inherited_locks`),
    exec'd ones never get it (``O_CLOEXEC``). A lock whose holder is a dead process of this host is taken over
    at once (the file is replaced under ``.lock.takeover``; whatever still holds the old file holds nothing);
    one held by a live process, or by one of another host, is :class:`RunDirLocked` naming it."""
    key = str(path.resolve())
    if key in _HELD:
        return _HELD[key]
    lock = path / LOCK_NAME
    fd, text = _open_locked(lock)
    taken_from = _dead_owner(text) if fd is not None else None
    if fd is None:
        dead = _dead_owner(text)
        if dead is not None:  # its process died, a process it had started still holds the file: replace the file
            with open(path / (LOCK_NAME + ".takeover"), "a") as mutex:
                fcntl.flock(mutex, fcntl.LOCK_EX)  # one taker at a time; released when the with block closes it
                fd, text = _open_locked(lock)
                if fd is None and _dead_owner(text) == dead:
                    os.unlink(lock)
                    fd, text = _open_locked(lock)
                taken_from = dead if fd is not None else None
        if fd is None:
            raise RunDirLocked(f"output_dir={path} is in use by another run ({text or 'unknown process'}); wait for it "
                               f"to finish, or use another --output-dir")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _HELD[key] = fd
    if taken_from is not None:
        _TAKEN_OVER[key] = taken_from
    return fd


def remove_stale_temporaries(path: Path, names: Iterable[str] = ("checkpoint.pth",)) -> List[Path]:
    """Delete ``.<name>.*.tmp`` left by saves that were killed mid-write (only safe under the lock)."""
    removed = []
    for name in names:
        for tmp in path.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        logger.warning("removed %d unfinished checkpoint file(s) of an interrupted save in %s", len(removed), path)
    return removed


def flatten(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"optim": {"lr": 0.3}}`` -> ``{"optim.lr": 0.3}`` (lists compare as values)."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def is_harmless(key: str, harmless: Iterable[str]) -> bool:
    """``key`` equals a harmless key or lies below a harmless section (``"eval"`` covers ``eval.every``)."""
    return any(key == h or key.startswith(h + ".") for h in harmless)


def config_changes(new: Mapping[str, Any], old: Mapping[str, Any]) -> List[Change]:
    """Every (flattened key, old value, new value) that differs between two configs, ``<absent>`` for a missing key."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")]


def check_resume_config(new: Mapping[str, Any], old: Mapping[str, Any], *, harmless: Iterable[str],
                        allow_change: bool, checkpoint: Union[str, Path]) -> List[Change]:
    """The differences between a checkpoint's config ``old`` and the new one; raise on trajectory changes.

    Returns every difference (harmless ones, and all of them when ``allow_change``) for the caller to log.
    """
    harmless = tuple(harmless)
    changes = config_changes(new, old)
    blocking = [c for c in changes if not is_harmless(c[0], harmless)]
    if blocking and not allow_change:
        listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in blocking)
        raise ConfigError(f"{checkpoint} was trained with another config, and these keys change the run: {listed}. "
                          f"Rerun with the checkpoint's values, use another --output-dir, or pass "
                          f"--allow-config-change to resume with the new values")
    return changes


def open_run_dir(path: Union[str, Path], config: Mapping[str, Any], *, harmless: Iterable[str],
                 allow_change: bool = False, checkpoint_name: str = "checkpoint.pth",
                 upgrade: Optional[Callable[[Mapping[str, Any]], Mapping[str, Any]]] = None) -> RunDir:
    """Create, lock and clean ``path``, then check ``config`` against the checkpoint it resumes from.

    Nothing but the lock file is written before the config check passes. On error the lock is released.
    """
    from selfsup.checkpoint import load_checkpoint

    path = make_run_dir(path)
    fd = lock_run_dir(path)
    try:
        remove_stale_temporaries(path, (checkpoint_name,))
        changes: List[Change] = []
        last = path / checkpoint_name
        if last.is_file():
            old = load_checkpoint(last, mmap=True).get("config")  # mmap: tensors are not read
            if isinstance(old, Mapping):
                old = upgrade(old) if upgrade is not None else old  # an older version's key names -> today's
                changes = check_resume_config(config, old, harmless=harmless, allow_change=allow_change,
                                              checkpoint=last)
    except BaseException:
        RunDir(path, fd, []).close()
        raise
    return RunDir(path, fd, changes)
