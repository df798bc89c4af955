"""The command-line doors: `python -m cozyrag_lib` and `./run_all.sh` (their errors, and one real run each)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from conftest import ROOT, run_cli
from cozyrag_lib import CozyError


def main_result(capsys, *args: str) -> SimpleNamespace:
    """`__main__.main(args)` in-process, shaped like a CompletedProcess (returncode, stdout, stderr)."""
    from cozyrag_lib.__main__ import main

    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out, stderr=err)


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
    (["chunk", "--preset=tiny", "--tpo_k=3"], ["chunk: unknown option --tpo_k", "did you mean --top_k"]),
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


# ----------------------------------------------------------------------------------------------
# one grammar for every command (cozyrag_lib/cli.py)


@pytest.mark.parametrize("args, message", [
    # the argparse spellings of ask / evaluate before the config's names
    (["ask", "--top-k", "3", "Who?"], "ask: unknown option --top-k (did you mean --top_k?)"),
    (["ask", "--run=x", "--top-k=3", "Who?"], "ask: unknown option --top-k (did you mean --top_k?)"),
    (["evaluate", "--qa=x.jsonl", "--batch-size=16"], "evaluate: unknown option --batch-size (did you mean --batch_size?)"),
    (["evaluate", "--qa", "x.jsonl", "--top-k", "3"], "evaluate: unknown option --top-k (did you mean --top_k?)"),
    (["chunk", "--max-articles=3"], "chunk: unknown option --max-articles (did you mean --max_articles?)"),
    # a command's own options, misspelt or given to another command
    (["ask", "--jsn", "Who?"], "ask: unknown option --jsn (did you mean --json?)"),
    (["evaluate", "--qa=x.jsonl", "--limt=3"], "evaluate: unknown option --limt (did you mean --limit?)"),
    (["train", "--resum"], "train: unknown option --resum (did you mean --resume?)"),
    (["index", "--resume"], "index: unknown option --resume"),
    (["bench", "index", "--max_pasages=3"], "bench index: unknown option --max_pasages (did you mean --max_passages?)"),
    (["bench", "ask", "--steps=3"], "bench ask: unknown option --steps"),
    # values
    (["ask", "--mode=oracle", "Who?"], "ask: --mode must be one of rag, closed, got 'oracle'"),
    (["evaluate", "--qa=x.jsonl", "--limit=many"], "evaluate: --limit='many' is not an integer"),
    (["evaluate", "--qa=x.jsonl", "--run"], "evaluate: --run needs a value (--run=VALUE)"),
    (["evaluate", "--top_k=3"], "evaluate: --qa is required"),
    (["ask", "--json"], "ask: QUESTION... is required"),
    (["ask", "--top_k=0", "Who?"], "config: top_k must be positive, got 0"),
    (["ask", "--device=tpu", "Who?"], "config: device must be auto, cpu or cuda, got 'tpu'"),
    (["train", "--debug=maybe"], "train: debug='maybe' is not a valid bool"),
])
def test_every_command_rejects_unknown_options_in_one_line(args, message, capsys):
    """Old spellings and unknown options: one line naming the closest spelling, status 2, no usage block."""
    r = main_result(capsys, *args)
    assert_one_line_error(r, message)
    assert "usage:" not in r.stdout + r.stderr


@pytest.mark.parametrize("args, message", [
    (["ask", "--top-k", "3", "Who?"], "error: ask: unknown option --top-k (did you mean --top_k?)"),
    (["evaluate", "--batch-size=16"], "error: evaluate: unknown option --batch-size (did you mean --batch_size?)"),
])
def test_an_old_spelling_is_one_line_and_status_2_in_a_real_run(args, message):
    r = run_cli(*args)
    assert_one_line_error(r, message)
    assert r.stderr.strip() == message and r.stdout == ""


def test_ask_and_evaluate_check_every_value_before_loading_models(tmp_path, capsys):
    """Config values and the run are checked first (no model is loaded for these: each is instant)."""
    from cozyrag_lib.__main__ import main

    assert main(["ask", f"--out_root={tmp_path}", "--run_name=none", "Who?"]) == 2
    assert f"no run folder {tmp_path / 'none'} (the preset's run" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "nope"), "--qa", "x.jsonl"]) == 2
    assert "no such run folder" in capsys.readouterr().err


@pytest.mark.parametrize("flag, traceback", [
    ("--debug", True), ("--debug=true", True), ("--debug=1", True), ("--debug=yes", True),
    ("--debug=false", False), ("--debug=0", False), (None, False),
])
def test_every_spelling_of_debug_is_the_same_switch(flag, traceback, tmp_path, capsys):
    """A CozyError from a stage (a missing input): its traceback with --debug in any spelling, else one line."""
    from cozyrag_lib.__main__ import main

    args = ["index", "--preset=tiny", f"--out_root={tmp_path}"]
    assert main([*args, *([flag] if flag else [])]) == 2
    err = capsys.readouterr().err
    assert ("Traceback" in err) == traceback, err
    assert err.strip().splitlines()[-1].startswith("error: ") and "passages" in err
    if not traceback:
        assert len(err.strip().splitlines()) == 1


def test_debug_is_the_config_key():
    from cozyrag_lib.cli import debug_requested, parse_command

    for flag in ("--debug", "--debug=true", "--debug=1"):
        assert parse_command("chunk", ["--preset=tiny", flag]).config().debug is True
        assert debug_requested(["chunk", flag])
    assert parse_command("chunk", ["--preset=tiny", "--debug=false"]).config().debug is False
    assert not debug_requested(["chunk", "--debug=false"]) and not debug_requested(["ask", "--", "--debug"])


def test_debug_before_the_command_name(tmp_path):
    r = run_cli("--debug=true", "index", "--preset=tiny", f"--out_root={tmp_path}")
    assert r.returncode == 2 and "Traceback" in r.stderr and "CozyError" in r.stderr


@pytest.mark.parametrize("command", ["prepare-qa", "chunk", "index", "train", "ask", "evaluate"])
def test_help_lists_the_commands_options_and_the_config_keys(command, capsys):
    from cozyrag_lib.__main__ import main
    from cozyrag_lib.cli import COMMANDS
    from cozyrag_lib.config import FIELDS

    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m cozyrag_lib {command} [--preset=NAME] [--key=value ...]")
    for name, (kind, _, text) in COMMANDS[command][1].items():
        assert (f"{name.upper()}..." if kind is list else f"--{name}") in out and text in out
    assert "--KEY=VALUE" in out and "cozyrag_lib/config.py" in out and "--debug" in out
    assert all(k in out for k in FIELDS)


def test_help_of_ask_is_a_real_exit_0():
    r = run_cli("ask", "--help")
    assert r.returncode == 0 and r.stderr == ""
    assert "--run=RUN" in r.stdout and "--mode=rag|closed" in r.stdout and "--json" in r.stdout
    assert "QUESTION..." in r.stdout and "top_k" in r.stdout


def test_help_of_bench_lists_every_benchmarks_options(capsys):
    from cozyrag_lib.__main__ import main
    from cozyrag_lib.cli import COMMANDS

    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert main(["bench", "scale", "--help"]) == 0
    scale = capsys.readouterr().out
    assert scale.startswith("usage: python -m cozyrag_lib bench scale") and "--k_factors=K_FACTORS" in scale
    for name in ("index", "train", "ask", "scale"):
        for option in COMMANDS[f"bench {name}"][1]:
            assert f"--{option}" in out, (name, option)


def test_bench_gets_the_parsed_command_line(monkeypatch, capsys):
    from cozyrag_lib import bench

    got = []
    monkeypatch.setitem(bench.BENCHMARKS, "scale", lambda parsed: got.append(parsed) or {"benchmark": "scale"})
    assert bench.cli(["scale", "--preset", "tiny", "--n", "64", "--threads=1", "--nprobe", "4", "--noise=0.5"]) == 0
    (parsed,) = got
    assert parsed.options["n"] == 64 and parsed.options["noise"] == 0.5 and parsed.options["k"] == 10  # typed, defaults
    assert parsed.config().nprobe == 4 and parsed.config().run_name == "tiny"  # the config keys
    assert json.loads(capsys.readouterr().out)["threads"] == 1
    with pytest.raises(CozyError, match="bench scale: --noise must not be negative, got -1.0"):
        bench.cli(["scale", "--preset=tiny", "--noise=-1"])


def test_parse_command_forms():
    from cozyrag_lib.cli import parse_command

    p = parse_command("evaluate", ["--run", "base:demo", "--qa=t.jsonl", "--limit", "-1", "--top_k", "8",
                                   "--batch_size=16", "--device=cpu", "--do_sample"])
    assert p.options == {"run": "base:demo", "qa": "t.jsonl", "format": "auto", "corpus": None, "mode": "rag",
                         "limit": -1, "out": None}
    assert p.overrides == {"top_k": "8", "batch_size": "16", "device": "cpu", "do_sample": "true"}
    assert p.given == {"run", "qa", "limit"}
    cfg = p.config()
    assert (cfg.top_k, cfg.batch_size, cfg.device, cfg.do_sample) == (8, 16, "cpu", True)
    q = parse_command("ask", ["--json", "Who?", "--mode", "closed", "--", "--not-an-option", "-h"])
    assert q.options == {"question": ["Who?", "--not-an-option", "-h"], "run": None, "mode": "closed", "json": True}
    assert q.as_argv() == ["--mode=closed", "--json", "--", "Who?", "--not-an-option", "-h"]
    assert parse_command("ask", q.as_argv()).options == q.options
    assert parse_command("train", ["--resume=false"]).options == {"resume": False}
    assert parse_command("train", ["--preset", "tiny", "--resume"]).options == {"resume": True}


@pytest.mark.slow
def test_config_keys_reach_ask_and_evaluate(tiny_run, tmp_path, monkeypatch, capsys):
    """--top_k=2 changes what ask retrieves; evaluate answers --eval_batch_size questions at a time with --top_k."""
    from cozyrag_lib import evaluate as evaluate_module
    from cozyrag_lib.__main__ import main

    run = f"base:{tiny_run.run_dir}"
    counts = {}
    for k in (2, 3):
        assert main(["ask", "--run", run, "--json", f"--top_k={k}", "--device=cpu", "Who was Ada Lovelace?"]) == 0
        counts[k] = len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["passages"])
    assert counts == {2: 2, 3: 3}

    batches = []
    real = evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate", lambda rag, items, mode, batch_size, **kw: (
        batches.append((batch_size, rag.cfg.top_k)) or real(rag, items, mode, batch_size=batch_size, show_progress=False)))
    out = tmp_path / "e.json"
    assert main(["evaluate", "--run", run, "--qa", str(tiny_run.paths.qa_split("test")), "--limit=3",
                 "--top_k", "2", "--eval_batch_size=3", f"--out={out}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert batches == [(3, 2)] and summary["top_k"] == 2 and summary["n"] == 3


# train: `python -m cozyrag_lib train` parses with cli.parse_command now; `python -m cozyrag_lib.train` (what
# torchrun runs) does once train.py's cli()/main() call it. Until then the tests of that door are expected to fail.
TRAIN_PY_USES_THE_GRAMMAR = "parse_command" in (ROOT / "cozyrag_lib" / "train.py").read_text(encoding="utf-8")


def test_train_through_the_package_command_takes_resume_and_the_grammar(tmp_path):
    r = run_cli("train", "--preset", "tiny", f"--out_root={tmp_path}", "--run_name", "empty", "--resume")
    assert r.returncode == 2 and "--resume but no checkpoint" in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "train.jsonl" in r.stderr
    assert_one_line_error(run_cli("train", "--batch-size=2"), "train: unknown option --batch-size (did you mean --batch_size?)")


@pytest.mark.xfail(not TRAIN_PY_USES_THE_GRAMMAR, strict=True,
                   reason="train.py's cli()/main() do not call cli.parse_command / cli.debug_requested yet")
def test_train_module_speaks_the_same_grammar(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cozyrag_lib.train", "--batch-size=2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert_one_line_error(r, "train: unknown option --batch-size (did you mean --batch_size?)")
    r = subprocess.run([sys.executable, "-m", "cozyrag_lib.train", "--preset", "tiny", f"--out_root={tmp_path}",
                        "--resume", "--debug=true"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "Traceback" in r.stderr and "train.jsonl" in r.stderr


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
    manifest = json.loads((run_dir / "index" / "manifest.json").read_text())
    assert manifest["passages"] == summaries["chunk"]["passages"] == summaries["index"]["passages"] > 0
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
