"""Parameter and FLOP counts of the multi-task models, and the report relative to the single-task set.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2 FLOPs; convolutions,
matmuls and their batched forms are counted, elementwise ops are not). Models are built on the ``meta``
device, so counting a ResNet-50 at 480x640 costs no compute.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: Tuple[int, int], *, batch_size: int = 1) -> int:
    """Forward FLOPs of ``model`` for one input of ``input_size`` (H, W), per image."""
    device = next(model.parameters()).device
    x = torch.zeros(batch_size, 3, *input_size, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops()) // batch_size


def model_cost(build: Callable[[], nn.Module], input_size: Tuple[int, int]) -> Dict[str, int]:
    """Params and FLOPs of the model ``build()`` returns, built on the meta device."""
    with torch.device("meta"):
        model = build()
    return {"params": count_parameters(model), "flops": count_flops(model, input_size)}


def relative_report(name: str, cost: Mapping[str, int], single_task: Mapping[str, Mapping[str, int]]) -> Dict[str, object]:
    """``cost`` next to the sum over the single-task models, with relative differences in percent."""
    st_params = sum(c["params"] for c in single_task.values())
    st_flops = sum(c["flops"] for c in single_task.values())
    return {"arch": name, "params": cost["params"], "flops": cost["flops"],
            "single_task_params": st_params, "single_task_flops": st_flops,
            "params_rel": 100.0 * (cost["params"] - st_params) / max(st_params, 1),
            "flops_rel": 100.0 * (cost["flops"] - st_flops) / max(st_flops, 1)}


def format_report(report: Mapping[str, object]) -> str:
    return (f"{report['arch']}: {report['params'] / 1e6:.2f}M params ({report['params_rel']:+.1f}% vs single-task set "
            f"{report['single_task_params'] / 1e6:.2f}M), {report['flops'] / 1e9:.2f} GFLOPs "
            f"({report['flops_rel']:+.1f}% vs {report['single_task_flops'] / 1e9:.2f})")


def cost_table(costs: Mapping[str, Mapping[str, int]], single_task_names: Sequence[str]) -> str:
    """Markdown table of params/FLOPs relative to the sum over ``single_task_names``."""
    st = {n: costs[n] for n in single_task_names}
    lines = ["| model | params (M) | GFLOPs | params vs ST | FLOPs vs ST |", "|---|---|---|---|---|"]
    for name, cost in costs.items():
        r = relative_report(name, cost, st)
        lines.append(f"| {name} | {r['params'] / 1e6:.2f} | {r['flops'] / 1e9:.2f} | {r['params_rel']:+.1f}% | {r['flops_rel']:+.1f}% |")
    return "\n".join(lines)
