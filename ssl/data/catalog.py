"""Dataset registry and data-root resolution.

Root lookup for a dataset name: explicit ``root`` > ``$SCENESSL_<NAME>_ROOT`` > nothing (error).
Either may be the word ``embedded``: the synthetic data of :func:`ensure_embedded_data` (generated
on first use). The name ``embedded`` itself resolves to the whole embedded root.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from selfsup.registry import Registry

DATASETS = Registry("dataset")

# name -> (paths that must exist under the root, human-readable layout); the readers outside this package
# (frozen.davis, frozen.voc, downstream.datasets) add theirs with register_layout
LAYOUTS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "coco": ((), "a folder of JPEG/PNG images (COCO: the folder holding train2017/, or train2017/ itself)"),
    "images": ((), "a folder (searched recursively) of JPEG/PNG images"),
    "classification": (("train",), "train/<class_name>/*.jpg and val/<class_name>/*.jpg"),
}
# subfolder of the embedded root holding each dataset
EMBEDDED_SUBDIR = {"coco": "coco", "images": "coco", "classification": "classification"}
# folders below a given root that may hold the layout (e.g. VOCdevkit/VOC2012/), per dataset
WRAPPERS: Dict[str, Tuple[str, ...]] = {}
EMBEDDED = "embedded"


def register_layout(name: str, markers: Tuple[str, ...], layout: str, *, embedded_subdir: str,
                    wrappers: Tuple[str, ...] = ()) -> None:
    """Declare dataset ``name``'s folder layout: the ``markers`` that must exist under its root, the ``layout``
    the error messages describe, its subfolder of the embedded data, and the ``wrappers`` (subfolders of a
    given root, e.g. ``VOCdevkit/VOC2012``) searched for it. Called by each reader beside its registration."""
    LAYOUTS[name] = (tuple(markers), layout)
    EMBEDDED_SUBDIR[name] = embedded_subdir
    WRAPPERS[name] = tuple(wrappers)


def env_var(name: str) -> str:
    return f"SCENESSL_{name.upper()}_ROOT"


def _matches_layout(name: str, path: Path) -> Optional[Path]:
    """The folder under ``path`` laid out as ``name`` expects (path itself or a known wrapper), or None."""
    markers = LAYOUTS[name][0]
    for candidate in (path, *(path / wrapper for wrapper in WRAPPERS.get(name, ()))):
        if candidate.is_dir() and all((candidate / m).exists() for m in markers):
            return candidate
    return None


def _embedded_root(name: str) -> Path:
    from .synthetic import ensure_embedded_data  # lazy: generation code is not needed otherwise

    root = ensure_embedded_data()
    return root if name == EMBEDDED else root / EMBEDDED_SUBDIR[name]


def resolve_data_root(name: str, root: Optional[Union[str, Path]] = None) -> Path:
    """Folder of dataset ``name``: explicit ``root`` > ``$SCENESSL_<NAME>_ROOT``; ``"embedded"`` as
    either value (or as ``name``) means the generated synthetic data. A ``name`` that is an existing
    folder and not a registered dataset is returned as is (an unlabelled image folder).

    Raises FileNotFoundError naming what was tried and the expected layout.
    """
    if name == EMBEDDED:
        return _embedded_root(name)
    if name not in LAYOUTS:
        if root is None and Path(name).is_dir():
            return Path(name)
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(LAYOUTS))} (or a folder path)")
    variable = env_var(name)
    tried: List[str] = []
    for source, value in ((f"root={root!r}", root), (f"${variable}", os.environ.get(variable))):
        if value is None or value == "":
            tried.append(f"{source}: not set")
            continue
        if str(value) == EMBEDDED:
            return _embedded_root(name)
        found = _matches_layout(name, Path(value).expanduser())
        if found is not None:
            return found
        tried.append(f"{source} -> {Path(value).expanduser()}: missing or not in the expected layout")
        break  # the first value given decides; a wrong explicit root never falls back silently
    raise FileNotFoundError(
        f"no data root for dataset {name!r}. Tried: " + "; ".join(tried) + ". "
        f"Expected layout: {LAYOUTS[name][1]}. Pass root=<path>, set ${variable}=<path>, or use "
        f"root='embedded' / ${variable}=embedded for the generated synthetic data (launch/make_data.py)."
    )


def build_dataset(name: str, **kwargs: Any) -> Any:
    """Build a registered dataset (``DATASETS.names()``); a folder path as ``name`` builds the
    unlabelled ``images`` dataset on that folder."""
    if name not in DATASETS and name != EMBEDDED and Path(name).is_dir():
        return DATASETS.build("images", root=name, **kwargs)
    return DATASETS.build(name, **kwargs)
