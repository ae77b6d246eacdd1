"""Typed configuration: dataclass defaults <- YAML (differences only) <- command-line ``key=value``.

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Type, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key."""


_WARNED: set = set()


def warn_deprecated(old: str, new: str) -> None:
    """One line on stderr (once per process): ``old`` (a flag or config key) still works for one release."""
    if (old, new) in _WARNED:
        return
    _WARNED.add((old, new))
    print(f"warning: {old} is deprecated and will be removed in the next release; use {new}", file=sys.stderr,
          flush=True)


def renamed_keys(schema: Any) -> Dict[str, str]:
    """A section's former key names: ``RENAMED_KEYS = {"arch": "backbone"}`` on the dataclass (old -> new)."""
    return dict(getattr(schema, "RENAMED_KEYS", {}) or {})


class _Loader(yaml.SafeLoader):
    """YAML as users write numbers: ``1e-4``, ``5E3`` and ``+1e-4`` are floats (YAML 1.1 reads them as strings)."""


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)
_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def yaml_load(text: str, *, source: str) -> Any:
    """``yaml.safe_load`` with user-style floats; a syntax error names ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


def check_counts(section: Any, prefix: str, *, positive: Iterable[str] = (), non_negative: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` naming ``<prefix><key>`` when a count or size is out of range (None = unset)."""
    for names, low, what in ((positive, 1, "> 0"), (non_negative, 0, ">= 0")):
        for name in names:
            value = getattr(section, name)
            if value is None or isinstance(value, bool):
                continue
            if (value < low) if isinstance(value, int) else (value < 0 or (low and value <= 0)):
                raise ConfigError(f"{prefix}{name}={value!r}: must be {what}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return merge(tp(), value, prefix=key + ".")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if isinstance(tp, type) and isinstance(value, tp) and tp not in (int, float, str, bool):
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def merge(cfg: T, updates: Mapping[str, Any], *, prefix: str = "", warn_renamed: bool = True) -> T:
    """Return a copy of dataclass ``cfg`` with ``updates`` (nested mapping) applied, strictly typed.

    A section's former key names (``RENAMED_KEYS``) are read as the new ones, with a deprecation warning unless
    ``warn_renamed`` is false (configs stored in older checkpoints)."""
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg)}
    renamed = renamed_keys(type(cfg))
    changes = {}
    for key, value in updates.items():
        if key in renamed and key not in fields:
            if renamed[key] in updates:
                raise ConfigError(f"config keys '{prefix}{key}' and '{prefix}{renamed[key]}' are the same setting "
                                  f"('{prefix}{key}' is its former name): give one")
            if warn_renamed:
                warn_deprecated(f"config key '{prefix}{key}'", f"'{prefix}{renamed[key]}'")
            key = renamed[key]
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'; allowed keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
                              f"{', '.join(sorted(fields))}")
        tp = hints[key]
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = merge(current, value, prefix=f"{prefix}{key}.", warn_renamed=warn_renamed)
        else:
            changes[key] = _coerce(value, tp, prefix + key)
    return dataclasses.replace(cfg, **changes)


def parse_overrides(overrides: Iterable[str]) -> Dict[str, Any]:
    """``["optim.lr=0.3", "model.arch=resnet18"]`` -> nested dict; values are parsed as YAML scalars."""
    flat: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.3)")
        key, raw = item.split("=", 1)
        flat[key.strip()] = yaml_load(raw, source=f"override {item!r}") if raw != "" else ""
    return nested_updates(flat, skip_none=False)


def nested_updates(values: Mapping[str, Any], *, skip_none: bool = True) -> Dict[str, Any]:
    """``{"optim.lr": 0.1, "output_dir": None}`` -> ``{"optim": {"lr": 0.1}}`` (None = flag not given)."""
    nested: Dict[str, Any] = {}
    for key, value in values.items():
        if value is None and skip_none:
            continue
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def deep_update(base: Dict[str, Any], updates: Mapping[str, Any]) -> Dict[str, Any]:
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def load_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml_load(path.read_text(), source=str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(schema: Type[T], *, yaml_path: Optional[Union[str, Path]] = None,
                updates: Optional[Mapping[str, Any]] = None, overrides: Iterable[str] = ()) -> T:
    """Defaults of ``schema``, then the YAML file, then ``updates`` (from flags), then ``key=value`` overrides."""
    cfg = schema()
    layers = []
    if yaml_path is not None:
        layers.append((str(yaml_path), lambda: load_yaml(yaml_path)))
    layers.append(("command-line flags", lambda: dict(updates or {})))
    layers.append(("command-line overrides", lambda: parse_overrides(overrides)))
    for source, read in layers:
        try:
            cfg = merge(cfg, read())
        except (TypeError, ValueError) as err:  # ConfigError, or a section's own validation (__post_init__)
            message = str(err)
            raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None
    return cfg


def upgrade_keys(schema: Any, config: Mapping[str, Any]) -> Dict[str, Any]:
    """A stored config (nested dict) with the former key names of ``schema``'s sections renamed to the current ones
    (for comparing an older checkpoint's config with a new run's)."""
    renamed = renamed_keys(schema)
    hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    out: Dict[str, Any] = {}
    for key, value in config.items():
        new = renamed.get(key, key) if key not in hints else key
        tp = hints.get(new)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(tp):
            value = upgrade_keys(tp, value)
        out[new] = value
    return out


def to_dict(cfg: Any) -> Dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
