"""The folder ssl/ must never shadow Python's standard ssl module, from any directory or entry point."""
import subprocess
import sysconfig
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, run_env

STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
ENTRY_POINTS = ["launch/pretrain.py", "launch/export.py", "launch/make_data.py", "launch/bench_pretrain.py",
                "downstream/finetune_mtl.py", "downstream/bench_mtl.py", "downstream/linear_probe.py"]

# Runs an entry point's --help the way `python script.py` does (script folder first on sys.path),
# then reports which ssl module that process imported.
PROBE = """
import runpy, sys
script = sys.argv[1]
sys.argv = [script, '--help']
sys.path[0] = __import__('os').path.dirname(__import__('os').path.abspath(script))
try:
    runpy.run_path(script, run_name='__main__')
except SystemExit as e:
    assert e.code in (0, None), e.code
import ssl
print('SSLFILE', ssl.__file__, ssl.SSLContext.__module__)
"""


def _ssl_file(output: str) -> Path:
    line = [ln for ln in output.splitlines() if ln.startswith("SSLFILE")][-1]
    return Path(line.split()[1]).resolve()


def test_pytest_process_imports_stdlib_ssl():
    import ssl
    assert Path(ssl.__file__).resolve().parent == STDLIB
    assert hasattr(ssl, "SSLContext") and ssl.SSLContext.__module__ == "ssl"


@pytest.mark.parametrize("cwd", ["repo", "launch", "downstream", "ssl", "elsewhere"])
def test_import_ssl_from_any_directory(cwd, tmp_path):
    where = tmp_path if cwd == "elsewhere" else (REPO if cwd == "repo" else REPO / cwd)
    out = subprocess.run([PYTHON, "-c", "import ssl, selfsup.backbones; print('SSLFILE', ssl.__file__)"],
                         cwd=where, capture_output=True, text=True, env=run_env(), check=True).stdout
    assert _ssl_file(out).parent == STDLIB


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("from_repo", [True, False])
def test_entry_point_help_keeps_stdlib_ssl(entry, from_repo, tmp_path):
    script = REPO / entry
    if not script.exists():
        pytest.fail(f"entry point {entry} is missing")
    cwd = REPO if from_repo else tmp_path
    plain = subprocess.run([PYTHON, str(script), "--help"], cwd=cwd, capture_output=True, text=True, env=run_env())
    assert plain.returncode == 0, plain.stderr
    assert "usage" in plain.stdout.lower()
    probe = subprocess.run([PYTHON, "-c", PROBE, str(script)], cwd=cwd, capture_output=True, text=True, env=run_env())
    assert probe.returncode == 0, probe.stderr
    assert _ssl_file(probe.stdout).parent == STDLIB


def test_no_top_level_init_in_ssl_folder():
    assert not (REPO / "ssl" / "__init__.py").exists(), "ssl/__init__.py would shadow the standard library"
