"""Logging set-up and TensorBoard scalars: rank 0 prints, every rank writes its own log file."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, List, Mapping, Optional, Union

from torch.utils.tensorboard import SummaryWriter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Buffer(logging.Handler):
    """Keeps the records logged before the run dir may be written (:func:`setup_early_logging`)."""

    def __init__(self, capacity: int = 10000) -> None:
        super().__init__()
        self.records: List[logging.LogRecord] = []
        self.capacity = capacity

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.capacity:
            self.records.append(record)


def setup_early_logging(*, rank: int = 0, level: int = logging.INFO) -> None:
    """Log to stdout (rank 0) while a run validates its config and inputs, before anything is written into its
    run dir; :func:`setup_logging` with the run dir then writes these records into its log file too."""
    setup_logging(None, rank=rank, level=level)
    buffer = _Buffer()
    buffer._scenessl = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(buffer)


def setup_logging(run_dir: Optional[Union[str, Path]] = None, *, rank: int = 0, level: int = logging.INFO) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    early: List[logging.LogRecord] = []
    for handler in list(root.handlers):
        if getattr(handler, "_scenessl", False):
            if isinstance(handler, _Buffer):
                early = handler.records
            root.removeHandler(handler)
    handlers = []
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    file_handler = None
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(run_dir) / f"log_rank{rank}.txt")
        handlers.append(file_handler)
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler._scenessl = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if file_handler is not None:
        for record in early:  # what setup_early_logging showed on stdout, now in the run's log file too
            file_handler.handle(record)


class ScalarWriter:
    """TensorBoard writer that only exists on rank 0 (other ranks: no-ops)."""

    def __init__(self, log_dir: Union[str, Path], *, enabled: bool = True) -> None:
        self.writer = SummaryWriter(str(log_dir)) if enabled else None

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(prefix + name, float(value), step)

    def image(self, tag: str, image: Any, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC" if image.shape[-1] in (1, 3) else "CHW")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
