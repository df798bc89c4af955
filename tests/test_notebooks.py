"""The notebooks' shape (title, a literal-only parameters cell, config from notebook_config) and the strip check.

Running them is the job of `pytest --nbval-lax` on the tiny preset (see `./run_all.sh test`).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from conftest import ROOT
from cozyrag_lib.config import FIELDS

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
STRIP = [sys.executable, str(ROOT / "tools" / "strip_notebooks.py")]


def test_the_numbered_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names[:3] == ["01_prepare_qa.ipynb", "02_chunk_corpus.ipynb", "03_build_index.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shape(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    title, params, config = nb.cells[:3]
    # a title and one line saying what the stage produces
    assert title.cell_type == "markdown" and title.source.startswith(f"# {path.name[:2]} ")
    # the parameters cell holds plain literals only, each a config key (or the preset)
    assert params.cell_type == "code" and params.metadata.get("tags") == ["parameters"]
    tree = ast.parse(params.source)
    names = []
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1, ast.unparse(stmt)
        ast.literal_eval(stmt.value)  # raises on anything but a literal
        names.append(stmt.targets[0].id)
    # derived values come after: the next cell builds the config from the parameters, naming any
    # parameter that is not a config key in `extra=` (e.g. a default question)
    calls = [n for n in ast.walk(ast.parse(config.source))
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "notebook_config"]
    assert len(calls) == 1 and ast.unparse(calls[0].args[0]) == "globals()", config.source
    extra = [ast.literal_eval(k.value) for k in calls[0].keywords if k.arg == "extra"]
    allowed = set(FIELDS) | set(*extra)
    assert names[0] == "preset" and set(names[1:]) <= allowed, set(names[1:]) - allowed


def _dirty_notebook(path):
    nb = new_notebook(cells=[new_markdown_cell("# 99 test"), new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                             new_code_cell("x + 1")],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                                "papermill": {"duration": 1.0}, "language_info": {"name": "python", "version": "3.11.7"}})
    nb.cells[2].execution_count = 3
    nb.cells[2].outputs = [new_output("execute_result", {"text/plain": "2"}, execution_count=3)]
    nb.cells[2].metadata["execution"] = {"iopub.status.idle": "2026-01-01T00:00:00"}
    nbformat.write(nb, path)


def test_strip_check_fails_on_outputs_and_strip_fixes_them(tmp_path):
    path = tmp_path / "99_test.ipynb"
    _dirty_notebook(path)
    check = subprocess.run([*STRIP, "--check", str(tmp_path)], capture_output=True, text=True)
    assert check.returncode == 1 and f"error: {path}: has outputs" in check.stderr

    fix = subprocess.run([*STRIP, str(path)], capture_output=True, text=True)
    assert fix.returncode == 0 and f"stripped {path}" in fix.stdout
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[2].outputs == [] and nb.cells[2].execution_count is None
    assert "execution" not in nb.cells[2].metadata and "papermill" not in nb.metadata
    assert nb.cells[1].metadata["tags"] == ["parameters"]  # tags survive
    assert nb.metadata.language_info == {"name": "python"}

    again = subprocess.run([*STRIP, "--check", str(path)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr


def test_strip_check_rejects_a_broken_notebook(tmp_path):
    path = tmp_path / "broken.ipynb"
    path.write_text("{not json")
    r = subprocess.run([*STRIP, "--check", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {path}: not a readable notebook")


def _in_git_checkout() -> bool:
    r = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    return r.returncode == 0 and Path(r.stdout.strip()).resolve() == ROOT.resolve()


def test_committed_notebooks_are_stripped():
    # in a checkout, what git holds (a notebook saved with outputs in JupyterLab is stripped by the clean
    # filter on its way in); in a plain copy of the sources, the files
    index = ["--index"] if _in_git_checkout() else []
    r = subprocess.run([*STRIP, "--check", *index, "notebooks"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_clean_filter_strips_what_git_stores_and_status_stays_clean(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    run = lambda *a: subprocess.run([*git, *a], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    (tmp_path / ".gitattributes").write_text((ROOT / ".gitattributes").read_text())
    run("config", "filter.cozyrag-strip.clean", f"'{sys.executable}' '{STRIP[1]}' --filter")
    (tmp_path / "notebooks").mkdir()
    path = tmp_path / "notebooks" / "99_test.ipynb"
    _dirty_notebook(path)  # as JupyterLab saves it: outputs, counts, run metadata
    run("add", ".gitattributes", "notebooks")
    run("commit", "-q", "-m", "x")
    stored = run("show", "HEAD:notebooks/99_test.ipynb")
    assert stored == subprocess.run([*STRIP, "--filter"], input=path.read_text(), capture_output=True, text=True).stdout
    assert '"outputs": []' in stored and '"execution_count": null' in stored and "papermill" not in stored
    r = subprocess.run([*STRIP, "--check", "--index", "notebooks"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and "1 checked (as staged in git)" in r.stdout, r.stderr
    # the working copy keeps its outputs, and git does not count them as a change
    assert "execution_count\": 3" in path.read_text()
    path.touch()
    assert run("status", "--porcelain") == ""
    # a notebook git cannot read (saved half-way) passes through the filter unchanged
    broken = subprocess.run([*STRIP, "--filter"], input="{not json", capture_output=True, text=True)
    assert broken.returncode == 0 and broken.stdout == "{not json" and "left as it is" in broken.stderr
