"""The layers point one way: ``selfsup`` (ssl/) <- ``frozen`` <- ``downstream`` <- entry points.

Every module is parsed with ``ast`` (imports inside functions included, and ``importlib.import_module`` /
``__import__`` calls with a literal name), so a lazy import counts like a top-level one.
"""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from conftest import PYTHON, REPO, run_env

# folder -> (the package it is imported as, the top-level packages it must never import)
LAYERS = {"ssl": ("selfsup", {"frozen", "downstream"}), "frozen": ("frozen", {"downstream"})}


def imported_modules(path: Path, package: str) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (relative imports resolved against ``package``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield node.lineno, ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def module_package(folder: str, path: Path) -> str:
    """The package ``path`` belongs to, as imported: ssl/data/images.py -> selfsup.data."""
    parts = path.relative_to(REPO / folder).with_suffix("").parts
    return ".".join([LAYERS[folder][0], *parts[:-1]])


def violations(folder: str):
    forbidden = LAYERS[folder][1]
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, module in imported_modules(path, module_package(folder, path)):
            if module.split(".")[0] in forbidden:
                yield f"{path.relative_to(REPO)}:{line} imports {module}"


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_no_upward_imports(folder):
    found = list(violations(folder))
    assert not found, f"{folder}/ must not import {sorted(LAYERS[folder][1])}: " + "; ".join(found)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The parser catches what it must: an import inside a function, a relative one, import_module."""
    source = tmp_path / "probe.py"
    source.write_text("import os\n\ndef f():\n    from downstream.mtl import losses\n    from ..data import images\n"
                      "    importlib.import_module('frozen.knn')\n")
    found = [m for _, m in imported_modules(source, "selfsup.moco")]
    assert found == ["os", "downstream.mtl", "selfsup.data", "frozen.knn"]


def test_importing_selfsup_loads_neither_frozen_nor_downstream():
    """Every selfsup module imported in one fresh process: no frozen/downstream module gets loaded."""
    modules = sorted(".".join(["selfsup", *p.relative_to(REPO / "ssl").with_suffix("").parts]).removesuffix(".__init__")
                     for p in (REPO / "ssl").rglob("*.py"))
    code = ("import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('frozen', 'downstream'))\n"
            "import ssl\nprint('BAD', bad, 'SSL', ssl.__file__, ssl.SSLContext.__module__)\n")
    out = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, env=run_env())
    assert out.returncode == 0, out.stderr[-2000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("BAD")][-1]
    assert line.startswith("BAD [] SSL "), line
    assert line.endswith(" ssl") and "/ssl/__init__" not in line and str(REPO / "ssl") not in line


def test_a_job_that_unpickles_pretrain_gets_the_monitors(tmp_path):
    """What a SLURM job (submitit) or a spawned local worker does: unpickle the launched callable in a fresh
    process that has imported nothing, then look the monitors up. The callable, frozen.pretrain_monitors.pretrain,
    brings its module and so the registrations with it."""
    cloudpickle = pytest.importorskip("cloudpickle")  # what submitit pickles with
    from frozen.pretrain_monitors import pretrain

    blob = tmp_path / "job.pkl"
    blob.write_bytes(cloudpickle.dumps(pretrain))
    code = (f"import pickle, sys\nfn = pickle.loads(open({str(blob)!r}, 'rb').read())\n"
            "from selfsup.monitors import MONITORS\nprint('MONITORS', fn.__module__, MONITORS.names())\n")
    out = subprocess.run([PYTHON, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=run_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MONITORS frozen.pretrain_monitors ['davis', 'knn', 'retrieval']" in out.stdout
