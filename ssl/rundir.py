"""The run directory of a training run: one writer at a time, and a resume only under the same config.

:func:`open_run_dir` is what a training set-up calls on the writing process (rank 0) before it writes
anything into ``output_dir``:

1. create the folder (an ``output_dir`` below a regular file is a :class:`ConfigError` naming both);
2. take an exclusive ``fcntl.flock`` on ``<output_dir>/.lock`` and write the holder's pid and host into it.
   A second run on the same folder fails at once naming that pid and host. The kernel drops the lock when
   its holder dies (kill -9, node reboot, SLURM preemption), so a stale lock is reclaimed by the next run
   and a requeued SLURM job simply continues;
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
        """Log the accepted config changes (call once logging writes into the run dir)."""
        for key, old, new in self.accepted_changes:
            logger.info("config change on resume accepted: %s: %r -> %r", key, old, new)

    def close(self) -> None:
        if self._fd is not None:
            _HELD.pop(str(self.path.resolve()), None)
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


def lock_run_dir(path: Path) -> int:
    """Take the exclusive lock of run dir ``path``; return its descriptor (keep it open while writing)."""
    key = str(path.resolve())
    if key in _HELD:
        return _HELD[key]
    lock = path / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise RunDirLocked(f"output_dir={path} is in use by another run ({holder}); wait for it to finish, "
                               f"or use another --output-dir") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _HELD[key] = fd
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


def check_resume_config(new: Mapping[str, Any], old: Mapping[str, Any], *, harmless: Iterable[str],
                        allow_change: bool, checkpoint: Union[str, Path]) -> List[Change]:
    """The differences between a checkpoint's config ``old`` and the new one; raise on trajectory changes.

    Returns every difference (harmless ones, and all of them when ``allow_change``) for the caller to log.
    """
    harmless = tuple(harmless)
    a, b = flatten(old), flatten(new)
    changes = [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
               if a.get(k, "<absent>") != b.get(k, "<absent>")]
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
