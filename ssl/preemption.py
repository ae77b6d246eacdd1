"""Preemption of a running training: SIGTERM or SIGUSR1 -> a checkpoint at the current step, then exit 75.

A training loop holds a :class:`PreemptionHandler` while it runs (``with PreemptionHandler() as preemption``)
and asks ``preemption.should_stop(step)`` after every optimizer step. The signal handler only sets a flag;
the loop then writes its checkpoint at that step (nothing is lost), logs and prints one line, and raises
:class:`Preempted`, a ``SystemExit`` with code :data:`EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again later").
Rerunning the same command resumes bit-exactly from that step.

- Only signals whose handler is the default are taken: under submitit (``--slurm``) SIGTERM stays submitit's,
  and its preemption signal (USR2) requeues the job as before (docs/slurm.md).
- Every checkpoint write holds :func:`signals_deferred`: a termination signal that arrives mid-write (ours,
  submitit's USR2/SIGTERM, SLURM's) reaches its handler once the file is complete and renamed, so a
  preemption never turns a save into a failed write. A second signal of the same kind during the write ends
  the process at once (its handler or the default action); the previous checkpoint survives (saves are
  atomic).
- Forked children (data loader workers) get the default handlers back, so they still end on SIGTERM.
- Several processes (``WORLD_SIZE > 1``): the ranks agree on stopping every :data:`SYNC_EVERY` steps (one
  all-reduce of a flag), so all of them save and stop at the same step.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, Dict, List, Optional

logger = logging.getLogger(__name__)

EXIT_CODE = 75  # os.EX_TEMPFAIL
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SYNC_EVERY = 10
# held back while a checkpoint is written: ours, submitit's preemption signal (USR2) and SLURM's SIGTERM
DEFERRED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_INSTALLED: Dict[int, Any] = {}  # signal -> the handler it replaced, while a PreemptionHandler is active


def _defaults_in_child() -> None:
    for signum in list(_INSTALLED):
        signal.signal(signum, signal.SIG_DFL)
    _INSTALLED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_defaults_in_child)


class signals_deferred:
    """Hold :data:`DEFERRED_SIGNALS` back for the duration of a ``with`` block (a checkpoint write).

    A signal that arrives inside the block is recorded and, when the block ends, its original handler is put
    back and the signal raised again, so the handler (a preemption flag, submitit's requeue-and-exit, the
    default termination) runs once the write is complete. A second signal of the same number inside the block
    is not held: the original handler runs at once. Signals whose handler is ``SIG_IGN`` are left alone;
    outside the main thread, and when nested, the block changes nothing."""

    _holding = False  # a block is active in this process (an inner one changes nothing)

    def __init__(self) -> None:
        self.saved: Dict[int, Any] = {}
        self.pending: List[int] = []
        self.active = False

    def __enter__(self) -> "signals_deferred":
        if threading.current_thread() is not threading.main_thread() or signals_deferred._holding:
            return self
        signals_deferred._holding = self.active = True
        for signum in DEFERRED_SIGNALS:
            handler = signal.getsignal(signum)
            if handler not in (signal.SIG_IGN, None):
                self.saved[signum] = handler
                signal.signal(signum, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        if signum not in self.pending:
            self.pending.append(signum)
            return
        self.pending.remove(signum)  # a second one: no more waiting
        signal.signal(signum, self.saved.pop(signum))
        signal.raise_signal(signum)

    def __exit__(self, *exc: Any) -> None:
        if not self.active:
            return
        signals_deferred._holding = self.active = False
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
        self.saved.clear()
        for signum in self.pending:
            signal.raise_signal(signum)
        self.pending.clear()


class Preempted(SystemExit):
    """The run stopped on a preemption signal after saving a checkpoint at the current step (exit code 75)."""

    def __init__(self, message: str, *, is_main: bool = True) -> None:
        super().__init__(EXIT_CODE)
        self.message, self.is_main = message, is_main

    def __str__(self) -> str:
        return self.message


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1 into a flag for the training loop (a no-op outside the main thread)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signum not in _INSTALLED and signal.getsignal(signum) == signal.SIG_DFL:
                    _INSTALLED[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: Any = None, exc: Any = None, tb: Any = None) -> None:
        for signum in list(_INSTALLED):
            signal.signal(signum, _INSTALLED.pop(signum))
        if isinstance(exc, Preempted) and exc.is_main:  # (after the loop's progress bar is closed)
            logger.warning("%s", exc.message)
            print(exc.message, file=sys.stderr, flush=True)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now, the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def should_stop(self, step: int, device: Any = None, *, force: bool = False) -> bool:
        """Whether to checkpoint and stop after ``step`` (every rank gets the same answer; with several ranks
        they agree every SYNC_EVERY steps, or now with ``force``)."""
        from selfsup.distributed import get_world_size

        if get_world_size() == 1:
            return self.signum is not None
        if step % SYNC_EVERY and not force:
            return False
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0.0 if self.signum is None else float(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())

    def stop(self, where: str, checkpoint: Any, *, is_main: bool = True) -> Preempted:
        """The :class:`Preempted` to raise once the checkpoint at ``where`` is written (leaving the handler's
        ``with`` block logs it and prints it on stderr, rank 0)."""
        message = (f"preempted by {self.name} at {where}: checkpoint saved to {checkpoint}; run the same command "
                   f"again to resume from this step (exit code {EXIT_CODE})")
        return Preempted(message, is_main=is_main)
