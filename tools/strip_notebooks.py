"""Strip outputs and execution counts from notebooks, or check that they are stripped.

Notebooks are committed clean: what a run produced belongs in `outputs/notebooks/`, not in git.

    python tools/strip_notebooks.py                  # strip notebooks/*.ipynb in place
    python tools/strip_notebooks.py --check          # exit 1 if stripping would change any notebook
    python tools/strip_notebooks.py --check a.ipynb  # the same for the named files or folders

"Clean" means: no outputs, no execution counts, no per-run metadata (papermill, widgets, timings), and
the file is laid out exactly as nbformat writes it, so the check is a byte comparison.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nbformat

# cell metadata that only records what happened in one run; tags (e.g. "parameters") are kept
VOLATILE_CELL_KEYS = ("execution", "papermill", "collapsed", "scrolled", "ExecuteTime", "jupyter")
VOLATILE_NOTEBOOK_KEYS = ("papermill", "widgets", "toc", "varInspector")


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove outputs, counts and run metadata in place; returns `nb`."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        for key in VOLATILE_CELL_KEYS:
            cell.metadata.pop(key, None)
    for key in VOLATILE_NOTEBOOK_KEYS:
        nb.metadata.pop(key, None)
    # language_info gains the interpreter version when run; keep only what does not change
    if "language_info" in nb.metadata:
        nb.metadata.language_info = {"name": nb.metadata.language_info.get("name", "python")}
    return nb


def stripped_text(path: Path) -> str:
    """The file's text as it should be committed."""
    nb = nbformat.read(path, as_version=4)
    text = nbformat.writes(strip(nb))
    return text if text.endswith("\n") else text + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write beside `path`, then rename over it: an interrupted run never leaves half a notebook.

    (The tool stays free of cozyrag_lib so it runs in any Python that has nbformat, e.g. a git hook.)
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def find_notebooks(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(x for x in p.rglob("*.ipynb") if ".ipynb_checkpoints" not in x.parts)
        elif p.suffix == ".ipynb" and p.is_file():
            found.append(p)
        else:
            raise SystemExit(f"error: {p}: not a notebook or folder")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", default=["notebooks"], help="notebooks or folders (default: notebooks)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if any notebook is not clean")
    args = ap.parse_args(argv)

    dirty = []
    for path in find_notebooks(args.paths):
        try:
            want = stripped_text(path)
        except Exception as e:  # nbformat raises several types for broken JSON/schema
            print(f"error: {path}: not a readable notebook ({e})", file=sys.stderr)
            return 2
        if path.read_text(encoding="utf-8") == want:
            continue
        dirty.append(path)
        if not args.check:
            write_atomically(path, want)
            print(f"stripped {path}")
    if args.check and dirty:
        for path in dirty:
            print(f"error: {path}: has outputs, execution counts or run metadata", file=sys.stderr)
        print("run `python tools/strip_notebooks.py` and commit the result", file=sys.stderr)
        return 1
    if args.check:
        print(f"notebooks clean: {len(find_notebooks(args.paths))} checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
