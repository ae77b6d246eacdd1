"""Export a pretrained backbone to torchvision, detectron2 or official-MoCo checkpoint formats."""
from __future__ import annotations

import logging
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from selfsup.backbones import build_backbone
from selfsup.checkpoint import (CheckpointError, atomic_write, backbone_state_dict, load_checkpoint, save_checkpoint,
                                state_dict_from_file)

logger = logging.getLogger(__name__)

FORMATS = ("torchvision", "detectron2", "moco")


def detectron2_name(name: str) -> str:
    """torchvision ResNet key -> detectron2 key (SPEC §1 mapping)."""
    m = re.match(r"layer(\d)\.(.*)", name)
    if m is None:  # stem: conv1 / bn1
        name = "stem." + name
    else:
        name = f"res{int(m.group(1)) + 1}.{m.group(2)}"
    name = re.sub(r"bn(\d)", r"conv\1.norm", name)
    name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    return name


def to_detectron2(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    model = OrderedDict((detectron2_name(k), v.detach().cpu().numpy()) for k, v in state.items()
                        if not k.endswith("num_batches_tracked"))
    return {"model": model, "__author__": "scenessl", "matching_heuristics": True}


def _official_name(encoder: str, name: str) -> str:
    """Our encoder key (``backbone.conv1.weight``, ``head.0.weight``) -> the official MoCo model's key
    (``module.encoder_q.conv1.weight``, ``module.encoder_q.fc.0.weight``)."""
    if name.startswith("head."):
        return f"module.{encoder}.fc.{name[len('head.'):]}"
    return f"module.{encoder}.{name[len('backbone.'):] if name.startswith('backbone.') else name}"


def to_moco(checkpoint: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
            optimizer: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The official MoCo training-checkpoint layout (main_moco.py: ``{'epoch', 'arch', 'state_dict', 'optimizer'}``).

    ``state_dict``: ``module.encoder_q.*`` and ``module.encoder_k.*`` (the MLP head as ``fc.0``/``fc.2``),
    ``module.queue`` [dim, K], ``module.queue_ptr`` [1] and, for runs with kNN positives, the backbone queue as
    ``module.queue_backbone`` [C, K] (the improved-recipe code's name and layout). ``epoch``: epochs completed,
    which is the epoch main_moco.py resumes at. ``optimizer``: from :func:`moco_optimizer_state`, or ``{}``.
    """
    model = checkpoint.get("model", {})
    out: Dict[str, torch.Tensor] = OrderedDict()
    for enc in ("encoder_q", "encoder_k"):
        backbone = {k[len(enc) + 1:]: v for k, v in model.items() if k.startswith(enc + ".backbone.")}
        if enc == "encoder_q" and not backbone:
            backbone = {f"backbone.{k}": v for k, v in state.items()}
        for k, v in backbone.items():
            out[_official_name(enc, k)] = v
        for k, v in model.items():
            if k.startswith(enc + ".head."):
                out[_official_name(enc, k[len(enc) + 1:])] = v
    if "key_queue" in model:
        out["module.queue"] = model["key_queue"].t().contiguous()  # official layout: [dim, K]
        out["module.queue_ptr"] = model["queue_ptr"].reshape(1)
        if model.get("backbone_queue") is not None and model["backbone_queue"].shape[0] > 0:  # kNN positives on
            out["module.queue_backbone"] = model["backbone_queue"].t().float().contiguous()  # [C, K], fp32
    return {"epoch": int(checkpoint.get("epoch", 0)), "arch": checkpoint.get("arch", "resnet50"),
            "state_dict": out, "optimizer": optimizer or {}}


def _query_parameters(config: Mapping[str, Any]) -> List[Tuple[str, torch.Size]]:
    """(name, shape) of the query encoder's parameters in the order our optimiser holds them (built on the meta
    device: no memory, no compute)."""
    from selfsup.config import merge
    from selfsup.moco.config import ModelConfig
    from selfsup.moco.model import Encoder

    cfg = merge(ModelConfig(), config.get("model", {}), prefix="model.", warn_renamed=False)  # the model section only: other sections
    # of an older run's config may hold keys this version no longer knows
    with torch.device("meta"):
        encoder = Encoder(build_backbone(cfg.backbone), hidden_dim=cfg.hidden_dim, out_dim=cfg.dim, head_bn=cfg.head_bn)
    return [(name, p.shape) for name, p in encoder.named_parameters()]


def moco_optimizer_state(checkpoint: Mapping[str, Any], *, source: object = "checkpoint") -> Dict[str, Any]:
    """Our SGD state (over ``encoder_q.parameters()``) renumbered for main_moco.py's ``SGD(model.parameters())``.

    The official optimiser holds the query encoder's parameters, then the key encoder's (in the same module order:
    backbone, then ``fc``). The key encoder gets no gradient, so SGD keeps no momentum buffer for it: the state
    holds the query encoder's buffers only, at their official indices, and ``param_groups`` lists all indices.
    Raises :class:`CheckpointError` (one line) when the checkpoint lacks what this needs.
    """
    config, opt = checkpoint.get("config"), checkpoint.get("optimizer")
    if not isinstance(config, Mapping) or not config:
        raise CheckpointError(f"{source}: no 'config' in the checkpoint, so its optimizer state cannot be matched "
                              f"to parameters")
    if not isinstance(opt, Mapping) or "param_groups" not in opt or "state" not in opt:
        raise CheckpointError(f"{source}: no optimizer state in the checkpoint")
    model = checkpoint.get("model")
    if not isinstance(model, Mapping) or "key_queue" not in model or not any(k.startswith("encoder_k.") for k in model):
        raise CheckpointError(f"{source}: not a training checkpoint (no key encoder or queue), so main_moco.py "
                              f"cannot resume from it")
    optim_name = config.get("optim", {}).get("name", "sgd")
    if optim_name != "sgd":
        raise CheckpointError(f"{source}: trained with optim.name={optim_name}; the official MoCo scripts resume an SGD "
                              f"state (momentum buffers)")
    try:
        params = _query_parameters(config)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{source}: its 'config' does not describe a model ({err})") from None
    if len(opt["param_groups"]) != 1 or len(opt["param_groups"][0]["params"]) != len(params):
        held = sum(len(g["params"]) for g in opt["param_groups"])
        raise CheckpointError(f"{source}: the optimizer state holds {held} parameters in "
                              f"{len(opt['param_groups'])} group(s), the query encoder of its config has "
                              f"{len(params)} in one")
    official = [_official_name(enc, n) for enc in ("encoder_q", "encoder_k") for n, _ in params]
    index = {n: i for i, n in enumerate(official)}
    state: Dict[int, Dict[str, Any]] = {}
    for ours, entry in opt["state"].items():
        if not 0 <= int(ours) < len(params):
            raise CheckpointError(f"{source}: the optimizer state names parameter {ours}, the query encoder of its "
                                  f"config has {len(params)}")
        name, shape = params[int(ours)]
        buf = entry.get("momentum_buffer")
        if buf is not None and buf.shape != shape:
            raise CheckpointError(f"{source}: the momentum buffer of {name} is {tuple(buf.shape)}, the parameter "
                                  f"is {tuple(shape)}")
        state[index[_official_name("encoder_q", name)]] = dict(entry)
    group = {k: v for k, v in opt["param_groups"][0].items() if k not in ("params", "param_names")}
    group["params"] = list(range(len(official)))
    return {"state": state, "param_groups": [group]}


def _moco_optimizer(checkpoint: Mapping[str, Any], wanted: Optional[bool], source: object) -> Dict[str, Any]:
    if wanted is False:
        return {}
    try:
        state = moco_optimizer_state(checkpoint, source=source)
    except CheckpointError as err:
        if wanted:
            raise CheckpointError(f"{err}; export with --no-optimizer (optimizer=False) for the weights and "
                                  f"queues only") from None
        logger.warning("optimizer state not exported (%s): the file serves the linear-classification script, "
                       "not a resume of main_moco.py", err)
        return {}
    if checkpoint.get("step_in_epoch", 0):
        logger.warning("%s was saved %d steps into epoch %d: main_moco.py resumes at the start of that epoch",
                       source, checkpoint["step_in_epoch"], checkpoint.get("epoch", 0))
    return state


# formats whose consumers build a ResNet (torchvision.models.resnet*, detectron2's ResNet): the backbone keys must
# be torchvision ResNet keys; the MoCo layout only adds prefixes and takes any backbone
RESNET_ONLY_FORMATS = ("torchvision", "detectron2")
_RESNET_KEY = re.compile(r"(conv1|bn1|layer[1-4])\.")


def check_resnet_state(state: Mapping[str, torch.Tensor], *, fmt: str, source: object = "checkpoint") -> None:
    """Raise ``ValueError`` unless ``state`` holds torchvision ResNet keys (``conv1``, ``bn1``, ``layer1-4``)."""
    other = [k for k in state if not _RESNET_KEY.match(k)]
    if other or "conv1.weight" not in state:
        example = ", ".join(other[:3]) if other else "no conv1.weight"
        raise ValueError(f"{source}: export format {fmt!r} needs a ResNet backbone (torchvision keys conv1, bn1, "
                         f"layer1-4), but this backbone is not one (e.g. {example}); non-ResNet backbones such as "
                         f"hrnet18 can be exported with --format moco or loaded directly with "
                         f"selfsup.checkpoint.load_backbone_weights")


def export_backbone(checkpoint_path: Union[str, Path], *, fmt: str, out: Union[str, Path],
                    optimizer: Optional[bool] = None) -> Path:
    """Write the backbone of ``checkpoint_path`` to ``out`` in format ``fmt``.

    ``torchvision`` and ``detectron2`` need a ResNet backbone (``ValueError`` otherwise); ``moco`` takes any.
    ``optimizer`` (``moco`` only): True = the optimizer state is required (:class:`CheckpointError` if the
    checkpoint cannot provide it), False = ``"optimizer": {}``, None = included when the checkpoint provides it,
    else ``{}`` with a warning.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    out = Path(out)
    checkpoint = load_checkpoint(checkpoint_path)
    state = backbone_state_dict(state_dict_from_file(checkpoint, name=checkpoint_path))
    if not state:
        raise ValueError(f"{checkpoint_path}: no backbone weights found")
    if fmt in RESNET_ONLY_FORMATS:
        check_resnet_state(state, fmt=fmt, source=checkpoint_path)
    if fmt == "torchvision":
        save_checkpoint(state, out)
    elif fmt == "moco":
        save_checkpoint(to_moco(checkpoint, state, optimizer=_moco_optimizer(checkpoint, optimizer, checkpoint_path)),
                        out)
    else:
        weights = to_detectron2(state)
        atomic_write(out, lambda f: pickle.dump(weights, f), what="checkpoint",
                     size_hint=sum(a.nbytes for a in weights["model"].values()))
    return out
