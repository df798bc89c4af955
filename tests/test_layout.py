"""The library's shape: run paths named once, the flat-layout upgrade, the typed training state, the JSON
helpers' one-line errors, the markdown table helper, the doctests, and a one-way import graph."""
from __future__ import annotations

import ast
import doctest
import importlib
import itertools
from pathlib import Path

import pytest
import torch

from cozyrag_lib import CozyError, load_config
from cozyrag_lib.jsonio import iter_jsonl, read_json, read_jsonl, truncate_jsonl, write_jsonl
from cozyrag_lib.paths import RunPaths
from cozyrag_lib.report import markdown_table, val_answers_table
from cozyrag_lib.train_state import TrainState

LIB = Path(__file__).resolve().parent.parent / "cozyrag_lib"


@pytest.mark.parametrize("module", ["paths", "report", "train_data", "metrics", "text", "config", "distributed",
                                    "evaluate", "chunking", "qa", "embedding", "retriever_losses", "tables", "generate"])
def test_module_examples_run(module):
    m = importlib.import_module(f"cozyrag_lib.{module}")
    result = doctest.testmod(m, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result


def test_config_paths_point_into_the_run_folder(tmp_path):
    p = load_config("tiny", out_root=str(tmp_path), run_name="r").paths
    assert p.root == tmp_path / "r"
    assert p.passages == tmp_path / "r" / "passages" / "passages.jsonl"
    assert p.metrics.parent == p.val_answers.parent == p.checkpoints.parent == tmp_path / "r" / "train"
    assert p.config(p.train) == tmp_path / "r" / "train" / "config.json"
    assert p.stage_configs()[0] == p.config(p.train) and p.stage_configs()[-1] == p.qa / "config.json"


def test_upgrade_moves_a_flat_run_once_and_never_overwrites(tmp_path):
    run = tmp_path / "old"
    (run / "checkpoints" / "last").mkdir(parents=True)
    (run / "checkpoints" / "last" / "state.pt").write_bytes(b"s")
    for name, text in [("passages.jsonl", "P"), ("passages.config.json", "{}"), ("train.config.json", "{}"),
                       ("metrics.jsonl", "M"), ("val_answers.jsonl", "V")]:
        (run / name).write_text(text)
    p = RunPaths(run)
    moved = p.upgrade()
    assert "passages.jsonl -> passages/passages.jsonl" in moved and "checkpoints -> train/checkpoints" in moved
    assert p.passages.read_text() == "P" and p.metrics.read_text() == "M" and p.val_answers.read_text() == "V"
    assert (p.checkpoint / "state.pt").read_bytes() == b"s" and p.config(p.train).is_file()
    assert not (run / "passages.jsonl").exists() and not (run / "checkpoints").exists()
    assert p.upgrade() == []  # already in the new layout
    (run / "metrics.jsonl").write_text("stale")  # both present: the new one wins, the old one stays where it is
    assert p.upgrade() == [] and p.metrics.read_text() == "M"


def test_train_state_counts_steps_per_phase_kind_and_reads_old_checkpoints():
    st = TrainState.starting_at(3)
    assert (st.index_version, st.initial_index_version) == (3, 3)
    st.count_step("generator", epoch=0, pos=4)
    st.count_step("retriever", epoch=1, pos=0)
    assert (st.step, st.phase_step, st.gen_step, st.ret_step, st.epoch, st.pos) == (2, 2, 1, 1, 1, 1)
    assert st.kind_steps("generator") == 1 and st.kind_steps("retriever") == 1
    st.next_phase()
    assert (st.phase_index, st.phase_step, st.epoch, st.pos, st.step) == (1, 0, 0, 0, 2)
    # a checkpoint's state.pt: the state's keys plus rng / world_size / checksums, as plain types
    saved = {**st.to_dict(), "rng": [], "world_size": 2, "weight_checksums": [[1.0, 2.0]]}
    assert TrainState.from_dict(saved) == st
    loaded = TrainState.from_dict({"step": torch.tensor(5).item(), "phase_index": 1})  # missing keys: defaults
    assert (loaded.step, loaded.phase_index, loaded.gen_step) == (5, 1, 0)


def test_json_helpers_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n "b": }')
    with pytest.raises(CozyError, match=r"bad.json:2: not valid JSON.*; rebuild it"):
        read_json(bad, "rebuild it")
    with pytest.raises(CozyError, match=r"missing.json: not found"):
        read_json(tmp_path / "missing.json")
    assert read_json(tmp_path / "missing.json", missing_ok=True) is None
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"x": 1}\n\n{"x": 2}\n{"x": \n')
    with pytest.raises(CozyError, match=r"rows.jsonl:4: not valid JSON; rerun it"):
        list(iter_jsonl(rows, "rerun it"))
    assert list(itertools.islice(iter_jsonl(rows), 2)) == [(1, {"x": 1}), (3, {"x": 2})]  # blank line 2 skipped
    rows.write_bytes(b'{"x": 1}\n\xff\n')
    with pytest.raises(CozyError, match=r"rows.jsonl:2: not UTF-8"):
        read_jsonl(rows)
    assert read_jsonl(tmp_path / "none.jsonl", missing_ok=True) == []


def test_jsonl_write_and_truncate(tmp_path):
    path = tmp_path / "m.jsonl"
    assert write_jsonl(path, [{"i": i, "t": "é"} for i in range(5)]) == 5
    assert "é" in path.read_text(encoding="utf-8")  # UTF-8, not \\u escapes
    assert truncate_jsonl(path, 2) == 2 and [r["i"] for r in read_jsonl(path)] == [0, 1]
    assert truncate_jsonl(path, None) == 0 and read_jsonl(path) == []


def test_markdown_table_keeps_each_row_on_one_line(tmp_path):
    table = markdown_table(["step", "text"], [[3, "a | b\nc"], [4, None], [5, 0.12345]], align="rl")
    lines = table.splitlines()
    assert lines[1] == "|---:|---|" and len(lines) == 5
    assert lines[2] == "| 3 | a \\| b c |" and lines[3] == "| 4 | - |" and lines[4] == "| 5 | 0.123 |"
    assert val_answers_table(tmp_path).splitlines()[0] == "| step | question | answer | context |"  # no run yet


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at function level?) for the package's own modules imported by `path`."""
    tree, out = ast.parse(path.read_text()), []
    pkg = ".".join(path.relative_to(LIB.parent).with_suffix("").parts[:-1])
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(n) for f in funcs for n in ast.walk(f) if isinstance(n, ast.ImportFrom)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
            target = f"{base}.{node.module}" if node.module else base
            names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            out += [(n, id(node) in inner) for n in names]
    return out


def test_import_graph_is_one_way_and_at_module_top():
    for path in sorted(LIB.rglob("*.py")):
        for target, inner in _imports(path):
            assert target not in ("cozyrag_lib.train", "cozyrag_lib.__main__"), f"{path.name} imports {target}"
            # function-level imports of our own modules only where a cycle or the light CLI needs them
            assert not inner or path.name in ("config.py", "cli.py"), \
                f"{path.relative_to(LIB)} imports {target} inside a function"


def test_environment_yml_asks_at_least_what_pyproject_requires():
    """environment.yml installs the project with `pip install --no-deps -e .`, so pyproject's floors are never
    checked in a conda environment: it must list each of them, no lower (they drifted once: pytorch>=2.2 against
    torch>=2.4)."""
    import re
    import tomllib

    yaml = pytest.importorskip("yaml")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    def floor(req):
        return max((Version(s.version) for s in req.specifier if s.operator == ">="), default=None)

    root = LIB.parent
    required = {canonicalize_name(r.name): floor(r) for r in map(Requirement, tomllib.loads(
        (root / "pyproject.toml").read_text())["project"]["dependencies"])}
    deps = yaml.safe_load((root / "environment.yml").read_text())["dependencies"]
    listed = {}
    for spec in [d for d in deps if isinstance(d, str)] + [p for d in deps if isinstance(d, dict) for p in d["pip"]]:
        if not re.fullmatch(r"[\w.-]+=[\d.]+", spec):  # a conda pin ("python=3.11") is not a requirement
            req = Requirement("torch" + spec[len("pytorch"):] if spec.startswith("pytorch") else spec)  # conda's name
            listed[canonicalize_name(req.name)] = floor(req)
    for name, need in required.items():
        assert name in listed, f"environment.yml lacks {name} (pyproject: {need})"
        assert need is None or (listed[name] is not None and listed[name] >= need), (name, listed[name], need)
