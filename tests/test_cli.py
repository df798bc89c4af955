"""The command-line doors: `python -m cozyrag_lib` and `./run_all.sh` (their errors, and one real run each)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT, run_cli


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit status 2, a single `error: ...` line on stderr naming every fragment, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# ----------------------------------------------------------------------------------------------
# python -m cozyrag_lib


def test_help_lists_the_commands():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for command in ("prepare-qa", "chunk", "index", "train"):
        assert command in r.stdout


def test_no_command_prints_usage_and_fails():
    r = run_cli()
    assert r.returncode == 2 and "commands:" in r.stdout


def test_unknown_command():
    assert_one_line_error(run_cli("chunkk"), "unknown command 'chunkk'", "prepare-qa")


@pytest.mark.parametrize("args, fragments", [
    (["chunk", "--preset=tiny", "--tpo_k=3"], ["unknown config key 'tpo_k'", "did you mean top_k"]),
    (["index", "--top_k=zero"], ["top_k='zero' is not a valid int"]),
    (["index", "--top_k=0"], ["top_k must be positive"]),
    (["prepare-qa", "--lr_generator=-1"], ["lr_generator must not be negative"]),
    (["chunk", "max_articles=3"], ["expected --key=value"]),
    (["chunk", "--preset=nope"], ["preset 'nope' not found"]),
])
def test_bad_overrides_exit_2_with_one_line(args, fragments):
    assert_one_line_error(run_cli(*args), *fragments)


def test_debug_shows_the_traceback():
    r = run_cli("chunk", "--tpo_k=3", "--debug")
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "CozyError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_missing_input_is_a_one_line_error(tmp_path):
    # the index stage before the chunk stage: the message says which file and which stage to run
    r = run_cli("index", "--preset=tiny", f"--out_root={tmp_path}")
    assert_one_line_error(r, "passages.jsonl", "chunk")


@pytest.mark.slow
def test_stage_commands_run_end_to_end_on_tiny(tmp_path, model_cache):
    """prepare-qa, chunk, index: each prints its summary as JSON and leaves its artefacts."""
    common = ["--preset=tiny", f"--out_root={tmp_path}", f"--model_cache={model_cache}", "--max_articles=30"]
    run_dir = tmp_path / "tiny"
    summaries = {}
    for command in ("prepare-qa", "chunk", "index"):
        r = run_cli(command, *common)
        assert r.returncode == 0, r.stderr
        summaries[command] = json.loads(r.stdout)
    for name in ("train", "validation", "test"):
        assert (run_dir / "qa" / f"{name}.jsonl").is_file()
    n_passages = sum(1 for _ in open(run_dir / "passages.jsonl", encoding="utf-8"))
    manifest = json.loads((run_dir / "index" / "manifest.json").read_text())
    assert manifest["passages"] == n_passages == summaries["index"]["passages"] > 0
    assert json.loads((run_dir / "index" / "config.json").read_text())["max_articles"] == 30


# ----------------------------------------------------------------------------------------------
# ./run_all.sh


def run_all(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """./run_all.sh with --skip-install, using the Python that runs the tests."""
    env = {**os.environ, "COZYRAG_VENV": sys.prefix, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), "--skip-install", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_run_all_help():
    r = run_all("--help")
    assert r.returncode == 0 and "--preset" in r.stdout and "test" in r.stdout


@pytest.mark.parametrize("args, fragments", [
    (["--bogus"], ["unknown argument '--bogus'"]),
    (["-p", "top_k"], ["-p needs KEY VALUE"]),
    (["-p", "tpo_k", "3"], ["unknown config key 'tpo_k'", "did you mean top_k"]),
    (["--preset", "nope"], ["preset 'nope' not found"]),
    (["-p", "top_k", "0"], ["top_k must be positive"]),
    (["--only", "99"], ["no notebooks match --only '99'"]),
    (["-p", "top_k", "None", "--only", "99"], ["no notebooks match"]),  # None = the preset's value: passes the check
])
def test_run_all_rejects_bad_arguments_before_running_anything(args, fragments):
    assert_one_line_error(run_all(*args), *fragments)


@pytest.mark.slow
def test_run_all_executes_a_notebook_with_parameters(tmp_path):
    out = tmp_path / "executed"
    r = run_all("--preset", "tiny", "--only", "01", "-p", "out_root", str(tmp_path / "runs"),
                "-r", "run_name", "2024", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    nb = nbformat.read(out / "01_prepare_qa.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code) and any(c.outputs for c in code)
    assert "injected-parameters" in nb.cells[2].metadata.get("tags", [])
    assert (tmp_path / "runs" / "2024" / "qa" / "train.jsonl").is_file()  # -r kept "2024" a string
    assert f"artefacts:          {tmp_path / 'runs' / '2024'}/" in r.stdout
