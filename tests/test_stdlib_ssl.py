"""The folder ssl/ must never shadow Python's standard ssl module, from any directory or entry point."""
import json
import subprocess
import sysconfig
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, run_env

STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
ENTRY_POINTS = ["launch/pretrain.py", "launch/export.py", "launch/make_data.py", "launch/bench_pretrain.py",
                "launch/gpu_report.py", "launch/demo.py", "launch/bench_recipe.py", "downstream/finetune_mtl.py",
                "downstream/bench_mtl.py",
                "downstream/linear_probe.py", "downstream/davis_propagation.py", "downstream/segment_retrieval.py",
                "downstream/task_affinity.py", "downstream/branch.py", "downstream/bench_balancers.py"]

# Runs the --help of every entry point of one folder the way `python script.py` does (the script's folder first
# on sys.path, ssl not imported yet), one after the other in one process (one torch import instead of one per
# entry point), and reports per entry point its exit code, its help text and which ssl module it got.
PROBE = """
import contextlib, io, json, os, runpy, sys
rest, results = list(sys.path[1:]), {}
for script in sys.argv[1:]:
    sys.path[:] = [os.path.dirname(os.path.abspath(script))] + rest
    for name in [m for m in sys.modules if m == 'ssl' or m.startswith('ssl.')]:
        del sys.modules[name]
    sys.argv, out, code = [script, '--help'], io.StringIO(), None
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name='__main__')
        except SystemExit as e:
            code = e.code
        except Exception as e:  # reported for this entry point; the others still run
            code = f'{type(e).__name__}: {e}'
    import ssl
    results[script] = dict(code=code, help=out.getvalue(), ssl=ssl.__file__, module=ssl.SSLContext.__module__)
print('RESULTS', json.dumps(results))
"""


def _ssl_file(output: str) -> Path:
    line = [ln for ln in output.splitlines() if ln.startswith("SSLFILE")][-1]
    return Path(line.split()[1]).resolve()


@pytest.fixture(scope="module")
def help_runs(tmp_path_factory):
    """(folder, from_repo) -> {entry: result}, one probe process per folder and working directory, on demand."""
    cache = {}

    def get(folder: str, from_repo: bool) -> dict:
        if (folder, from_repo) not in cache:
            entries = [e for e in ENTRY_POINTS if e.startswith(folder + "/") and (REPO / e).exists()]
            cwd = REPO if from_repo else tmp_path_factory.mktemp("elsewhere")
            res = subprocess.run([PYTHON, "-c", PROBE, *[str(REPO / e) for e in entries]], cwd=cwd,
                                 capture_output=True, text=True, env=run_env())
            assert res.returncode == 0, res.stderr[-3000:]
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
            results = json.loads(line[len("RESULTS "):])
            cache[folder, from_repo] = {e: results[str(REPO / e)] for e in entries}
        return cache[folder, from_repo]
    return get


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
def test_entry_point_help_keeps_stdlib_ssl(entry, from_repo, help_runs):
    if not (REPO / entry).exists():
        pytest.fail(f"entry point {entry} is missing")
    run = help_runs(entry.split("/")[0], from_repo)[entry]
    assert run["code"] in (0, None), run["code"]
    assert "usage" in run["help"].lower() and "--help" in run["help"]
    assert Path(run["ssl"]).resolve().parent == STDLIB and run["module"] == "ssl"


def test_every_entry_point_is_listed():
    scripts = {f"{folder}/{p.name}" for folder in ("launch", "downstream") for p in (REPO / folder).glob("*.py")
               if "__main__" in p.read_text()}
    assert scripts <= set(ENTRY_POINTS), f"add to ENTRY_POINTS: {sorted(scripts - set(ENTRY_POINTS))}"


def test_real_script_run_matches_the_probe(tmp_path):
    """One real `python script.py --help` from elsewhere, the way the probe above emulates it."""
    res = subprocess.run([PYTHON, str(REPO / "launch/pretrain.py"), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, env=run_env())
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout.lower()


def test_no_top_level_init_in_ssl_folder():
    assert not (REPO / "ssl" / "__init__.py").exists(), "ssl/__init__.py would shadow the standard library"
