"""The one command line of every entry point: shared options, deprecated aliases, one-line user errors.

Every script in ``launch/`` and ``downstream/`` builds its parser with :func:`entry_parser`, so all of them take

* ``key=value`` config overrides anywhere on the command line, and ``--config FILE`` (YAML, differences from the
  defaults of the entry point's typed config; unknown keys are a one-line error naming the key);
* ``--output-dir DIR`` (each entry point has a default) into which the resolved ``config.yaml`` is written;
* ``--weights FILE`` (entry points that load a backbone): a pretraining checkpoint, an official MoCo checkpoint, a
  torchvision state_dict or a detectron2 ``.pkl`` (anything :func:`selfsup.checkpoint.load_backbone_weights`
  reads), or ``none`` (random initialisation);
* ``--backbone NAME`` (config key ``model.backbone``; ``--arch`` is its former spelling);
* the launcher flags of :func:`selfsup.launcher.add_launch_args` (``--slurm``, ``--nodes``, ``--gpus-per-node``,
  ``--partition``, ``--sweep``, ...) on every entry point that trains or evaluates;
* ``--debug``: a user error shows its full traceback (also with ``SCENESSL_DEBUG=1``).

A user error (:func:`user_error_types`) ends in one line ``error: <what and where>`` on stderr and exit status 1,
no traceback; any other exception is a bug and keeps its traceback. Former flags stay for one release as
aliases that print one warning line naming the new spelling (:func:`add_deprecated`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from selfsup.config import ConfigError, save_config, warn_deprecated

logger = logging.getLogger(__name__)

DEBUG_ENV = "SCENESSL_DEBUG"
BACKBONES_HELP = "resnet18/34/50/101, hrnet18, resnet_small (CPU demo), resnet_tiny (tests)"
WEIGHTS_HELP = ("backbone weights: a pretraining checkpoint.pth, an official MoCo checkpoint, a torchvision "
                "state_dict, a detectron2 .pkl (launch/export.py's three formats), or 'none' (random init)")
SHARED_GROUP = "shared options (every entry point; README 'Command line')"


@dataclasses.dataclass
class BackboneConfig:
    """The ``model`` section of the frozen evaluations: which backbone, with which weights."""
    backbone: str = "resnet50"
    weights: str = ""  # a checkpoint or export (WEIGHTS_HELP), or 'none' (random init); required

    def require_weights(self, alternative: str = "") -> str:
        if not self.weights:
            raise ConfigError(f"model.weights is not set: give --weights FILE (or 'none' for a random init)"
                              f"{alternative}")
        if self.weights != "none" and not Path(self.weights).exists():
            raise FileNotFoundError(f"model.weights={self.weights}: not found (expected a checkpoint or an exported "
                                    f"backbone file)")
        return self.weights


# ---------------------------------------------------------------- deprecated aliases

_ACTIONS = {"store": argparse._StoreAction, "store_true": argparse._StoreTrueAction,
            "store_const": argparse._StoreConstAction, "append": argparse._AppendAction}


def add_deprecated(parser: argparse.ArgumentParser, *flags: str, new: str, dest: str, action: str = "store",
                   **kwargs: Any) -> argparse.Action:
    """Add ``flags`` as a hidden alias storing into ``dest`` that warns once, naming ``new``, when used."""
    base = _ACTIONS[action]

    class DeprecatedAlias(base):  # type: ignore[misc, valid-type]
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                      option_string: Optional[str] = None) -> None:
            warn_deprecated(option_string or flags[0], new)
            super().__call__(parser, namespace, values, option_string)

    kwargs.setdefault("default", argparse.SUPPRESS)  # the new flag's default stays in charge
    action_obj = parser.add_argument(*flags, dest=dest, action=DeprecatedAlias, help=argparse.SUPPRESS, **kwargs)
    action_obj.new_spelling = new  # type: ignore[attr-defined]  # read by the tests and the docs' list
    return action_obj


# ---------------------------------------------------------------- the shared parser

def entry_parser(doc: Optional[str], *, config_help: str = "YAML with the differences from the defaults",
                 output_help: str = "run directory (config.yaml and results)",
                 weights: Optional[str] = None, backbone: Optional[str] = None, launch: bool = False,
                 overrides_help: str = "config overrides key=value (anywhere on the command line)",
                 prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser every entry point starts from (the shared options in one group, the launch flags in another).

    ``weights`` / ``backbone``: help text of ``--weights`` / ``--backbone`` (None: the entry point loads no
    backbone). ``launch``: add the launcher flags (entry points that train or evaluate).
    """
    p = argparse.ArgumentParser(description=doc, prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group(SHARED_GROUP)
    g.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    g.add_argument("--config", metavar="FILE", help=config_help)
    g.add_argument("--output-dir", metavar="DIR", help=output_help + "; the resolved config.yaml is written there")
    if weights is not None:
        g.add_argument("--weights", metavar="FILE", help=weights)
    if backbone is not None:
        g.add_argument("--backbone", metavar="NAME", help=backbone + " (config key model.backbone)")
        add_deprecated(p, "--arch", new="--backbone", dest="backbone")
    g.add_argument("--debug", action="store_true", default=debug_from_env(),
                   help=f"show the full traceback of a user error (also with {DEBUG_ENV}=1)")
    if launch:
        from selfsup.launcher import add_launch_args

        add_launch_args(p)
    return p


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parse_intermixed_args`` (key=value anywhere) with a one-line error for a positional without '='."""
    args = parser.parse_intermixed_args(None if argv is None else list(argv))
    for item in getattr(args, "overrides", []) or []:
        if "=" not in item:
            parser.error(f"unexpected argument {item!r}: config overrides look like key=value (e.g. optim.lr=0.3)")
    return args


def debug_from_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _debug_in_argv(argv: Optional[Sequence[str]]) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else list(argv))


# ---------------------------------------------------------------- one-line user errors

def user_error_types() -> Tuple[type, ...]:
    """Exceptions that mean bad input or a stopped run, not a bug: entry points report them in one line."""
    from selfsup.checkpoint import CheckpointError, CheckpointMismatchError, CheckpointSaveError
    from selfsup.data.images import DataError
    from selfsup.rundir import RunDirLocked

    return (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, KeyError,
            CheckpointError, CheckpointMismatchError, CheckpointSaveError, RunDirLocked, DataError,
            FloatingPointError)


def one_line(err: BaseException) -> str:
    message = str(err.args[0] if isinstance(err, KeyError) and err.args else err).strip()
    if "Original Traceback" in message:  # re-raised from a DataLoader worker: the worker's own message
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(message.split()) or type(err).__name__


@contextlib.contextmanager
def user_errors(debug: Optional[bool] = None, argv: Optional[Sequence[str]] = None) -> Iterator[None]:
    """Bad input (config keys, missing or unreadable data and checkpoints, unknown names, a busy run dir, a full
    disk, a NaN loss) exits with ``error: <one line>`` (SystemExit, status 1), no traceback; with ``debug`` (the
    ``--debug`` flag, ``SCENESSL_DEBUG=1``, or ``--debug`` in ``argv``) the exception propagates with its
    traceback. Other exceptions (bugs) always propagate."""
    try:
        yield
    except user_error_types() as err:
        if debug or (debug is None and (debug_from_env() or _debug_in_argv(argv))):
            raise
        raise SystemExit(f"error: {one_line(err)}") from None


def run_main(main: Callable[..., Any], argv: Optional[Sequence[str]] = None) -> Any:
    """``if __name__ == "__main__": run_main(main)``: the user errors of ``main`` (also those raised before it
    parsed ``--debug``) end in one line."""
    with user_errors(argv=argv):
        return main(None if argv is None else list(argv))


# ---------------------------------------------------------------- output dir and launcher

def write_config(cfg: Any, output_dir: Any, *, entry: str) -> Path:
    """Write the resolved ``cfg`` (a dataclass) to ``<output_dir>/config.yaml``; return the path.

    The file starts with a comment naming ``entry``. A ``config.yaml`` there that another entry point wrote (a
    training run's, when exporting from or evaluating into its folder) is kept: this one goes to
    ``config.<entry>.yaml`` instead."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out}: is a file, expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    header = f"# resolved config of {entry}\n"
    path = out / "config.yaml"
    if path.is_file() and not path.read_text().startswith(header):
        path = out / f"config.{Path(entry).stem}.yaml"
        logger.info("%s holds another run's config.yaml: writing %s", out, path)
    save_config(cfg, path)
    path.write_text(header + path.read_text())
    return path


def check_launch_args(args: argparse.Namespace, *, processes: bool = True) -> None:
    """One-line errors for launch flags that cannot work here (before any config is built or file written).

    ``processes=False``: the entry point runs one process (an evaluation): ``--gpus`` and several SLURM tasks
    are refused instead of running the same job N times."""
    if getattr(args, "nodes", 1) > 1 and not args.slurm:
        raise ConfigError("--nodes > 1 needs --slurm")
    if args.slurm and shutil.which("sbatch") is None:
        raise ConfigError("--slurm given but 'sbatch' is not on PATH: run on a SLURM login node")
    if not processes:
        tasks = args.tasks_per_node or max(1, args.gpus_per_node)
        if args.gpus > 1 or args.nodes > 1 or tasks > 1:
            raise ConfigError("this evaluation runs in one process: use --gpus 1, --nodes 1 and at most one task "
                              "per node (--gpus-per-node 1)")


def launch(fn: Callable[[Any], Any], make_cfg: Callable[[List[str]], Any], args: argparse.Namespace, *,
           processes: bool = True) -> Any:
    """:func:`selfsup.launcher.launch` after :func:`check_launch_args`."""
    from selfsup import launcher

    check_launch_args(args, processes=processes)
    return launcher.launch(fn, make_cfg, args)


# ---------------------------------------------------------------- tools without a config schema of their own

_SHARED_DESTS = {"overrides", "config", "output_dir", "weights", "backbone", "debug", "help"}


def _launch_actions(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    return [a for g in parser._action_groups if g.title == "launch" for a in g._group_actions]


def flag_schema(parser: argparse.ArgumentParser, name: str) -> Any:
    """A typed config (dataclass) with one key per flag of ``parser`` (its dest, e.g. ``batch_size``), default
    the flag's default: the benchmarks and the data generator take ``key=value`` and ``--config`` this way."""
    import typing

    fields = []
    for action in parser._actions:
        if action.dest in _SHARED_DESTS or action.dest == argparse.SUPPRESS or action.default == argparse.SUPPRESS \
                or action in _launch_actions(parser):
            continue
        if any(f[0] == action.dest for f in fields):
            continue
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                   argparse.BooleanOptionalAction))
        tp: Any = bool if flag else (action.type if isinstance(action.type, type) else str)
        if not flag and (action.nargs in ("+", "*") or isinstance(action.nargs, int)):
            tp = typing.List[tp]
        if action.default is None:
            tp = typing.Optional[tp]
        default = action.default
        spec = dataclasses.field(default_factory=lambda d=default: list(d)) if isinstance(default, list) \
            else dataclasses.field(default=default)
        fields.append((action.dest, tp, spec))
    return dataclasses.make_dataclass(name, fields)


def apply_flag_config(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> Any:
    """Resolve ``--config`` and ``key=value`` over the flags of ``parser`` into ``args`` (in place); return the
    typed config. A key is a flag's name with '_' (``batch_size=8`` = ``--batch-size 8``); unknown keys and wrong
    types are one-line errors; a flag given explicitly wins over ``--config`` and loses to ``key=value``."""
    from selfsup.config import load_config

    schema = flag_schema(parser, name)
    defaults = schema()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(schema)
             if getattr(args, f.name, None) != getattr(defaults, f.name)}
    cfg = load_config(schema, yaml_path=args.config, updates=given, overrides=args.overrides)
    for action in parser._actions:
        if action.choices is not None and hasattr(cfg, action.dest):
            value = getattr(cfg, action.dest)
            if value is not None and value not in action.choices:
                raise ConfigError(f"{action.dest}={value!r}: expected one of {', '.join(map(str, action.choices))}")
    for f in dataclasses.fields(cfg):
        setattr(args, f.name, getattr(cfg, f.name))
    return cfg
