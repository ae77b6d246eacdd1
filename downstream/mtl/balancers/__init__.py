"""Loss balancers (SPEC §2), one file each, registered by name in ``BALANCERS``.

``build_balancer(name, tasks=..., **args)``; see :mod:`.base` for the interface. Names: fixed (default),
uncertainty, gradnorm, dwa, dtp, mgda, mgda_ub, auto_magnitude, pcgrad, cagrad.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Sequence

from selfsup.config import ConfigError

from ..components import BALANCERS
from . import auto_magnitude, cagrad, dtp, dwa, fixed, gradnorm, mgda, pcgrad, uncertainty  # noqa: F401  (register)
from .base import Balancer, GradientBalancer, SharedParts
from .dtp import task_kpis


def build_balancer(name: str, *, tasks: Sequence[str], args: Optional[Mapping[str, Any]] = None) -> Balancer:
    """E.g. ``build_balancer("dwa", tasks=("semseg", "depth"), args={"temperature": 2})``."""
    if name not in BALANCERS:
        raise ConfigError(f"optim.balancer: unknown balancer {name!r}; known: {', '.join(BALANCERS.names())}")
    cls = BALANCERS.get(name)
    args = dict(args or {})
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "tasks")]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ConfigError(f"optim.balancer_args: balancer {name!r} has no parameter {', '.join(unknown)}; "
                          f"it takes: {', '.join(accepted) or 'none'}")
    try:
        return cls(tasks, **args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optim.balancer_args of {name!r}: {err}") from None


def balancer_names() -> list:
    return BALANCERS.names()


__all__ = ["BALANCERS", "Balancer", "GradientBalancer", "SharedParts", "balancer_names", "build_balancer", "task_kpis"]
