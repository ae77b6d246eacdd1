"""Saving, resuming and loading checkpoints (one module owns the format).

A training checkpoint is one self-describing dict, e.g.
``{'epoch', 'step', 'arch', 'model', 'optimizer', 'scaler', 'config', 'rng', ...}``.
Saves are atomic: written to a temporary file in the same folder, fsynced, then renamed.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

LAST = "checkpoint.pth"
PathLike = Union[str, Path]


class CheckpointMismatchError(RuntimeError):
    """Weights do not fit the model; the message lists missing and unexpected keys."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not hold what was expected; the message names the file."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The file holds pickled Python objects that ``weights_only`` loading refuses (never load those)."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (e.g. a full disk); the previous checkpoint at the path is untouched."""


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> Path:
    """Atomically write ``state`` to ``path`` (a crash mid-save leaves the previous file intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, CheckpointSaveError):
            reason = "no space left on device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (
                err.strerror or str(err))
            kept = f"the previous checkpoint {path} is intact" if path.is_file() else "no previous checkpoint existed"
            error = CheckpointSaveError(f"could not write checkpoint {path}: {reason}; {kept}")
            error.errno = err.errno
            raise error from err
        raise
    return path


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu", *,
                    mmap: bool = False) -> Dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``; unreadable files raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not found"
        raise FileNotFoundError(f"checkpoint {path}: {what} (expected a .pth file written by torch.save)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # a pickled class or function, not garbage
            raise UnsafeCheckpointError(
                f"checkpoint {path} holds pickled Python objects besides tensors and plain containers; it is "
                f"refused for safety (expected a checkpoint of tensors, e.g. one written by this toolkit)") from None
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch file ({_first_line(err)}); "
                              f"expected a .pth file written by torch.save") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, IndexError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch file ({_first_line(err)}); "
                              f"expected a .pth file written by torch.save") from None
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


def last_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The checkpoint a run in ``run_dir`` resumes from, or None."""
    path = Path(run_dir) / LAST
    return path if path.is_file() else None


# ---------------------------------------------------------------- RNG state

def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": _numpy_state_to_plain(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(_plain_to_numpy_state(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(st: tuple) -> Dict[str, Any]:
    # numpy arrays are not allowed by weights_only loading: store the key as a tensor
    return {"name": st[0], "key": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
            "has_gauss": int(st[3]), "cached": float(st[4])}


def _plain_to_numpy_state(d: Mapping[str, Any]) -> tuple:
    return (d["name"], d["key"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


# ---------------------------------------------------------------- backbone weights

_PREFIXES = ("module.", "encoder_q.", "backbone.", "encoder.")


def state_dict_from_file(source: Union[PathLike, Mapping[str, Any]], *,
                         name: Optional[PathLike] = None) -> Dict[str, torch.Tensor]:
    """The model state_dict inside our checkpoints, MoCo-style checkpoints or plain state_dicts.

    ``name``: the file ``source`` was loaded from, for error messages when ``source`` is already loaded."""
    where = source if isinstance(source, (str, Path)) else (name or "the given state")
    ckpt = load_checkpoint(source) if isinstance(source, (str, Path)) else source
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint {where} holds a {type(ckpt).__name__}; expected a dict: a state_dict "
                              f"or a checkpoint with 'model' or 'state_dict'")
    for key in ("model", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = ckpt[key]
            break
    if not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        keys = ", ".join(list(map(str, ckpt))[:8]) or "none"
        raise CheckpointError(f"checkpoint {where} has no model weights (top-level keys: {keys}); expected a "
                              f"state_dict of tensors or a checkpoint with 'model' or 'state_dict'")
    return dict(ckpt)


def backbone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Extract backbone weights from a MoCo/our/torchvision state_dict.

    Accepts keys with or without ``module.``, ``encoder_q.``, ``backbone.`` prefixes; the key encoder,
    queues, projection head and classifier (``fc.*``/``head.*``) are dropped.
    """
    keys = list(state_dict)
    stripped = [k[len("module."):] if k.startswith("module.") else k for k in keys]
    has_query = any(k.startswith("encoder_q.") for k in stripped)
    out: Dict[str, torch.Tensor] = OrderedDict()
    for key, name in zip(keys, stripped):
        if has_query and not name.startswith("encoder_q."):
            continue  # encoder_k, queues, pointer
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        if name.startswith(("fc.", "head.")) or name in ("key_queue", "backbone_queue", "queue", "queue_ptr"):
            continue
        out[name] = state_dict[key]
    return out


def load_backbone_weights(backbone: nn.Module, source: Union[PathLike, Mapping[str, Any]], *,
                          strict: bool = True) -> Dict[str, list]:
    """Load backbone weights from any supported file; raise listing missing/unexpected keys on mismatch."""
    weights = backbone_state_dict(state_dict_from_file(source))
    own = backbone.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shape_errors = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own if k in weights and weights[k].shape != own[k].shape]
    if shape_errors or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(_mismatch_message(source, missing, unexpected, shape_errors))
    backbone.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    if missing or unexpected:
        logger.warning("%s", _mismatch_message(source, missing, unexpected, []))
    return {"missing": missing, "unexpected": unexpected}


def _mismatch_message(source: Any, missing: Iterable[str], unexpected: Iterable[str], shapes: Iterable[str]) -> str:
    def head(items: Iterable[str]) -> str:
        items = list(items)
        return ", ".join(items[:12]) + (f" ... (+{len(items) - 12} more)" if len(items) > 12 else "") if items else "none"

    where = source if isinstance(source, (str, Path)) else "state_dict"
    return (f"weights from {where} do not match the backbone: missing keys: {head(missing)}; "
            f"unexpected keys: {head(unexpected)}; shape mismatches: {head(shapes)}")
