"""Saving, resuming and loading checkpoints (one module owns the format).

A training checkpoint is one self-describing dict, e.g.
``{'epoch', 'step', 'arch', 'model', 'optimizer', 'scaler', 'config', 'rng', ...}``.
Saves are atomic: written to a temporary file in the same folder, fsynced, then renamed; a preemption signal
that arrives meanwhile is handled after the rename (:func:`selfsup.preemption.signals_deferred`).
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from selfsup.preemption import signals_deferred

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
    """Atomically write ``state`` to ``path`` (a crash mid-save leaves the previous file intact).

    A failed write (a full disk, a quota, an I/O error) raises :class:`CheckpointSaveError`: one line naming
    ``path`` and the cause; the previous file at ``path`` is untouched and no temporary file is left."""
    return atomic_write(path, lambda f: torch.save(dict(state), f), what="checkpoint",
                        size_hint=_tensor_bytes(state))


class _CheckedWriter:
    """A binary file for ``torch.save``/``pickle.dump`` that writes every byte or raises the ``OSError`` of the
    failing ``write(2)`` (and keeps it): ``torch.save`` reports a full disk as a short write, ``RuntimeError:
    [enforce fail at inline_container.cc] unexpected pos``, which loses the errno that tells a full disk apart."""

    def __init__(self, fd: int) -> None:
        self.fd, self.written = fd, 0
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                n = os.write(self.fd, view[done:])
            except OSError as err:
                self.error = self.error or err
                raise
            if n == 0:  # a zero-byte write: no progress possible
                self.error = self.error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                raise self.error
            done += n
        self.written += done
        return done

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.fd


def atomic_write(path: PathLike, write: Any, *, what: str = "checkpoint", size_hint: int = 0) -> Path:
    """``write(f)`` into a temporary file beside ``path``, fsync, rename onto ``path``; on failure remove the
    temporary file and raise :class:`CheckpointSaveError` naming ``path`` and the cause (``no space left on
    device`` from the failing write's errno, or from ``os.statvfs`` showing the file system full)."""
    path = Path(path)
    tmp: Optional[str] = None
    writer: Optional[_CheckedWriter] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with signals_deferred():  # a preemption signal mid-write waits for the rename
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                writer = _CheckedWriter(fd)
                write(writer)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            tmp = None
    except BaseException as err:
        written = writer.written if writer is not None else 0
        full = (_free_bytes(path.parent) or 0) < 64 * 1024  # (before the temporary file is removed)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, CheckpointSaveError):
            raise _save_error(path, err, writer.error if writer is not None else None, what=what, full=full,
                              written=written, size_hint=size_hint) from err
        raise
    return path


def _save_error(path: Path, err: BaseException, write_error: Optional[OSError], *, what: str, full: bool,
                written: int, size_hint: int) -> CheckpointSaveError:
    cause = write_error if write_error is not None else err
    chain = cause
    while chain is not None and not (isinstance(chain, OSError) and chain.errno):
        chain = chain.__cause__ or chain.__context__
    code = chain.errno if chain is not None else None
    if code is None and full:  # no errno (e.g. torch's short write), but the file system was full
        code = errno.ENOSPC
    if code in (errno.ENOSPC, errno.EDQUOT):
        need, free = max(size_hint, written), _free_bytes(path.parent)
        reason = ("no space left on device" if code == errno.ENOSPC else "disk quota exceeded") + (
            f" in {path.parent} ({_mb(free)} free" + (f", the {what} needs about {_mb(need)})" if need else ")")
            if free is not None else "")
    elif isinstance(chain, OSError):
        reason = chain.strerror or str(chain)
    else:
        reason = _first_line(cause)
    kept = f"the previous {what} {path} is intact" if path.is_file() else f"no previous {what} existed"
    error = CheckpointSaveError(f"could not write {what} {path}: {reason}; {kept}")
    error.errno = code
    return error


def _free_bytes(folder: Path) -> Optional[int]:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _mb(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 2 ** 20:.1f} MB"


def _tensor_bytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, Mapping):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    return 0


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
    """The model state_dict inside our checkpoints, MoCo-style checkpoints, plain state_dicts or a detectron2
    ``.pkl`` (read by :func:`load_detectron2_weights`, names mapped back to torchvision's).

    ``name``: the file ``source`` was loaded from, for error messages when ``source`` is already loaded."""
    where = source if isinstance(source, (str, Path)) else (name or "the given state")
    if isinstance(source, (str, Path)) and is_detectron2_file(source):
        return load_detectron2_weights(source)
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


# ---------------------------------------------------------------- detectron2 .pkl read-back

# the only globals a detectron2 weight file ({'model': {name: numpy array}, ...}) needs: numpy array/dtype/scalar
# reconstruction (numpy 1.x and 2.x module names), OrderedDict, and _codecs.encode (bytes in protocol-2 pickles)
_D2_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode"),
})
_D2_STAGE = re.compile(r"res([2-5])\.(.*)")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except those that rebuild numpy arrays (no code runs while loading)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _D2_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id")


def is_detectron2_file(path: PathLike) -> bool:
    """A ``.pkl`` file: the detectron2 weight format (a plain pickle; ``.pth`` files are torch zip archives)."""
    return Path(path).suffix == ".pkl"


def torchvision_name(name: str) -> str:
    """detectron2 ResNet key -> torchvision key (the inverse of ``selfsup.exporters.detectron2_name``):
    ``stem.conv1.norm.weight`` -> ``bn1.weight``, ``res2.0.conv3.norm.bias`` -> ``layer1.0.bn3.bias``,
    ``res3.0.shortcut.weight`` -> ``layer2.0.downsample.0.weight``, ``...shortcut.norm.*`` -> ``downsample.1.*``."""
    name = re.sub(r"conv(\d)\.norm\.", r"bn\1.", name)
    name = name.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    if name.startswith("stem."):
        return name[len("stem."):]
    m = _D2_STAGE.match(name)
    return f"layer{int(m.group(1)) - 1}.{m.group(2)}" if m else name


def load_detectron2_weights(path: PathLike) -> Dict[str, torch.Tensor]:
    """The ResNet weights of a detectron2 ``.pkl`` (``{'model': {name: numpy array}, '__author__': ...,
    'matching_heuristics': True}``, as ``launch/export.py --format detectron2`` and MoCo's converter write it) as
    a torchvision-named state_dict. A full detectron2 model's ``backbone.bottom_up.*`` keys are taken, its other
    keys dropped. Read with an unpickler that allows numpy arrays only; anything else raises
    :class:`UnsafeCheckpointError` / :class:`CheckpointError` (one line naming the file)."""
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not found"
        raise FileNotFoundError(f"checkpoint {path}: {what} (expected a detectron2 .pkl)")
    expected = "expected a detectron2 .pkl: a pickled dict {'model': {name: numpy array}}"
    try:
        with open(path, "rb") as f:
            data = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        if str(err).startswith("refused"):
            raise UnsafeCheckpointError(f"checkpoint {path} holds pickled Python objects besides numpy arrays "
                                        f"({err}); it is refused for safety ({expected})") from None
        raise CheckpointError(f"checkpoint {path} is not a readable pickle ({_first_line(err)}); {expected}") from None
    except (EOFError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, ImportError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or not a pickle ({_first_line(err)}); "
                              f"{expected}") from None
    model = data.get("model") if isinstance(data, Mapping) else None
    if not isinstance(model, Mapping) or not model:
        raise CheckpointError(f"checkpoint {path} has no 'model' dict of arrays; {expected}")
    if any(str(k).startswith("backbone.bottom_up.") for k in model):
        model = {k[len("backbone.bottom_up."):]: v for k, v in model.items() if k.startswith("backbone.bottom_up.")}
    out: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in model.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiub":
            what = type(value).__name__ if not isinstance(value, np.ndarray) else f"array of dtype {value.dtype}"
            raise CheckpointError(f"checkpoint {path}: model[{key!r}] is a {what}; {expected} (numeric)")
        out[torchvision_name(str(key))] = torch.from_numpy(np.ascontiguousarray(value))
    return out


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
    """Load backbone weights from any supported file (``.pth`` checkpoints and state_dicts, official MoCo files, a
    detectron2 ``.pkl``); raise listing missing/unexpected keys on mismatch. A missing BN ``num_batches_tracked``
    is not a mismatch (the backbone keeps its own counter)."""
    weights = backbone_state_dict(state_dict_from_file(source))
    own = backbone.state_dict()
    # BN step counters are not weights (detectron2 files and other exporters leave them out); the model keeps its own
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in own]
    shape_errors = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own if k in weights and weights[k].shape != own[k].shape]
    if shape_errors or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(_mismatch_message(source, missing, unexpected, shape_errors))
    backbone.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    if missing or unexpected:
        logger.warning("%s", _mismatch_message(source, missing, unexpected, []))
    return {"missing": missing, "unexpected": unexpected}


def load_model_state(model: nn.Module, weights: Mapping[str, torch.Tensor], *, source: PathLike,
                     hint: str = "") -> None:
    """``model.load_state_dict(weights)`` (strict), with one :class:`CheckpointMismatchError` line listing the shape
    mismatches and the missing and unexpected keys instead of PyTorch's multi-line report; ``hint`` is appended."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        message = _mismatch_message(source, missing, unexpected, shapes).replace("the backbone", "the model of this config")
        raise CheckpointMismatchError(message + hint)
    model.load_state_dict(weights)


def resume_hint(changes: Iterable[Any] = ()) -> str:
    """The end of a resume's mismatch message: the accepted config changes (``(key, old, new)``) that may cause it."""
    listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in changes if not str(k).startswith(("output_dir", "allow_")))
    return (f". --allow-config-change cannot change the model of a run{f' (changed: {listed})' if listed else ''}: "
            f"resume with the checkpoint's values or use another --output-dir")


# hyperparameters that tell optimizer families apart: SGD's groups have momentum and dampening, Adam's/AdamW's betas
# and eps
_OPTIMIZER_SIGNATURE = frozenset({"momentum", "dampening", "betas", "eps"})


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], *, source: PathLike) -> bool:
    """Resume ``optimizer`` from ``saved`` (its ``state_dict()``), keeping the hyperparameters the new config gave it
    (weight decay, momentum, betas, lr scales: PyTorch's own loading would silently restore the checkpoint's; the
    learning rate itself is set by the schedule at every step).

    State of another optimizer family (SGD <-> Adam, a config change accepted with ``--allow-config-change``) cannot
    carry over: the optimizer keeps its fresh state, a warning names both, and False is returned. Groups that do
    not fit (another number or size of parameter groups) are a one-line :class:`CheckpointMismatchError`."""
    groups = saved.get("param_groups") or [{}]
    old_sig, new_sig = (sorted(set(g) & _OPTIMIZER_SIGNATURE) for g in (groups[0], optimizer.param_groups[0]))
    if old_sig != new_sig:
        logger.warning("%s: its optimizer state is of another optimizer (groups with %s; %s has %s): %s starts with "
                       "fresh state (momentum buffers or moments are not carried over)", source,
                       ", ".join(old_sig) or "none", type(optimizer).__name__, ", ".join(new_sig) or "none",
                       type(optimizer).__name__)
        return False
    configured = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError) as err:
        sizes = [len(g.get("params", [])) for g in groups]
        raise CheckpointMismatchError(
            f"{source}: the optimizer state does not fit the optimizer of this config ({_first_line(err)}; parameter "
            f"groups: checkpoint {sizes} vs config {[len(g['params']) for g in optimizer.param_groups]}); resume with "
            f"the checkpoint's model and optim keys or use another --output-dir") from None
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
    return True


def _mismatch_message(source: Any, missing: Iterable[str], unexpected: Iterable[str], shapes: Iterable[str]) -> str:
    def head(items: Iterable[str]) -> str:
        items = list(items)
        return ", ".join(items[:12]) + (f" ... (+{len(items) - 12} more)" if len(items) > 12 else "") if items else "none"

    where = source if isinstance(source, (str, Path)) else "state_dict"
    return (f"weights from {where} do not match the backbone: missing keys: {head(missing)}; "
            f"unexpected keys: {head(unexpected)}; shape mismatches: {head(shapes)}")
