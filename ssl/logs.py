"""Logging set-up and TensorBoard scalars: rank 0 prints, every rank writes its own log file."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from torch.utils.tensorboard import SummaryWriter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(run_dir: Optional[Union[str, Path]] = None, *, rank: int = 0, level: int = logging.INFO) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_scenessl", False):
            root.removeHandler(handler)
    handlers = []
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / f"log_rank{rank}.txt"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler._scenessl = True  # type: ignore[attr-defined]
        root.addHandler(handler)


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
