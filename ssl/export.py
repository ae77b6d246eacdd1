"""Export a pretrained backbone to torchvision, detectron2 or official-MoCo checkpoint formats."""
from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch

from selfsup.checkpoint import backbone_state_dict, load_checkpoint, save_checkpoint, state_dict_from_file

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


def to_moco(checkpoint: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """The official MoCo training-checkpoint layout (``module.encoder_q.*``; the MLP head as ``fc.0``/``fc.2``)."""
    model = checkpoint.get("model", {})
    out: Dict[str, torch.Tensor] = OrderedDict()
    for enc in ("encoder_q", "encoder_k"):
        backbone = {k[len(enc) + len(".backbone."):]: v for k, v in model.items() if k.startswith(enc + ".backbone.")}
        if enc == "encoder_q" and not backbone:
            backbone = dict(state)
        for k, v in backbone.items():
            out[f"module.{enc}.{k}"] = v
        for k, v in model.items():
            if k.startswith(enc + ".head."):
                out[f"module.{enc}.fc.{k[len(enc) + len('.head.'):]}"] = v
    if "key_queue" in model:
        out["module.queue"] = model["key_queue"].t().contiguous()  # official layout: [dim, K]
        out["module.queue_ptr"] = model["queue_ptr"].reshape(1)
    return {"epoch": int(checkpoint.get("epoch", 0)), "arch": checkpoint.get("arch", "resnet50"),
            "state_dict": out, "optimizer": {}}


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


def export_backbone(checkpoint_path: Union[str, Path], *, fmt: str, out: Union[str, Path]) -> Path:
    """Write the backbone of ``checkpoint_path`` to ``out`` in format ``fmt``.

    ``torchvision`` and ``detectron2`` need a ResNet backbone (``ValueError`` otherwise); ``moco`` takes any.
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
        save_checkpoint(to_moco(checkpoint, state), out)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(to_detectron2(state), f)
        tmp.replace(out)
    return out
