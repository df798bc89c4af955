"""Strip outputs and execution counts from notebooks, or check that they are stripped.

Notebooks are committed clean: what a run produced belongs in `outputs/notebooks/`, not in git.

    python tools/strip_notebooks.py                  # strip notebooks/*.ipynb in place
    python tools/strip_notebooks.py --check          # exit 1 if stripping would change any notebook
    python tools/strip_notebooks.py --check a.ipynb  # the same for the named files or folders
    python tools/strip_notebooks.py --check --index  # the same for the versions staged in git (what a commit takes)
    python tools/strip_notebooks.py --filter <a.ipynb  # stripped to stdout: git's clean filter (see .gitattributes)

As git's clean filter (`./run_all.sh` sets it up: `git config filter.cozyrag-strip.clean
"PYTHON tools/strip_notebooks.py --filter"`), a notebook saved with outputs in JupyterLab is committed
without them, and `git status` does not count the outputs as a change.

"Clean" means: no outputs, no execution counts, no per-run metadata (papermill, widgets, timings), and
the file is laid out exactly as nbformat writes it, so the check is a byte comparison.
"""
from __future__ import annotations

import argparse
import os
import subprocess
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


def stripped_text(path: Path | None = None, text: str | None = None) -> str:
    """The file's (or the text's) notebook as it should be committed."""
    nb = nbformat.read(path, as_version=4) if text is None else nbformat.reads(text, as_version=4)
    text = nbformat.writes(strip(nb))
    return text if text.endswith("\n") else text + "\n"


def clean_filter() -> int:
    """stdin -> stdout, stripped. Text that is not a notebook (a file saved half-way) passes unchanged,
    with a warning: a clean filter that fails would make git stop."""
    raw = sys.stdin.buffer.read()
    try:
        out = stripped_text(text=raw.decode("utf-8")).encode("utf-8")
    except Exception as e:  # nbformat raises several types for broken JSON/schema
        print(f"warning: strip_notebooks --filter: not a readable notebook, left as it is ({e})", file=sys.stderr)
        out = raw
    sys.stdout.buffer.write(out)
    return 0


def staged_notebooks(paths: list[str]) -> list[tuple[str, str]]:
    """(path, text) of each notebook under `paths` as git's index holds it."""
    try:
        ls = subprocess.run(["git", "ls-files", "-s", "--", *paths], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"error: --index: not in a git checkout ({e})") from None
    found = []
    for line in ls.splitlines():
        meta, _, name = line.partition("\t")
        if name.endswith(".ipynb"):
            blob = subprocess.run(["git", "cat-file", "blob", meta.split()[1]], capture_output=True, check=True).stdout
            found.append((name, blob.decode("utf-8", errors="replace")))
    return found


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
    ap.add_argument("--index", action="store_true", help="with --check: check the versions staged in git's index")
    ap.add_argument("--filter", action="store_true", help="strip the notebook on stdin to stdout (git's clean filter)")
    args = ap.parse_args(argv)
    if args.filter:
        return clean_filter()
    if args.index and not args.check:
        ap.error("--index goes with --check")

    dirty = []
    if args.index:
        notebooks = [(Path(name), text) for name, text in staged_notebooks(args.paths)]
    else:
        notebooks = [(path, None) for path in find_notebooks(args.paths)]
    for path, text in notebooks:
        try:
            if text is None:
                text = path.read_text(encoding="utf-8")
            want = stripped_text(text=text)
        except Exception as e:  # nbformat raises several types for broken JSON/schema
            print(f"error: {path}: not a readable notebook ({e})", file=sys.stderr)
            return 2
        if text == want:
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
        print(f"notebooks clean: {len(notebooks)} checked{' (as staged in git)' if args.index else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
