"""When things go wrong: bad input, interruptions, a dying torchrun rank, no network.

1. A catalogue of bad inputs, each run through the real CLI (`cozyrag_lib.__main__.main`, a few in a subprocess):
   exit status 2, exactly one `error: ...` line naming the input and what is wrong, no traceback, and every
   file already in the run folder untouched (same bytes, same mtime).
2. SIGKILL during chunking or indexing, then a rerun: the old artefact (never half a file) survives the kill,
   the rerun writes what an uninterrupted run writes. (SIGKILL + `--resume` of training: tests/test_train.py.)
3. torchrun: a rank that dies ends the job without a hang, and `--max-restarts` resumes from the checkpoint.
4. Offline and safe by default: the tiny pipeline with every non-loopback socket blocked; static checks on
   remote code, `torch.load` and weight formats.

Bad input tested elsewhere (not repeated here): tests/test_qa.py (MALFORMED 20 importer cases, CLI_BAD 5 CLI
cases, missing file/folder, counted line skips, read_qa), tests/test_chunking.py (11 CLI source cases,
read_passages), tests/test_index.py (other retriever / dim / passages, damaged index.faiss, missing manifest,
no passages), tests/test_config.py and tests/test_cli.py (unknown keys, wrong types, nonsensical values,
preset files, notebook parameters, --debug), tests/test_train.py and tests/test_answer.py (missing stage
artefacts, missing run folder or QA file), tests/test_explore.py (the question box never evaluates its text).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli
from cozyrag_lib.__main__ import main
from cozyrag_lib.config import load_config
from cozyrag_lib.paths import RunPaths

LIB = ROOT / "cozyrag_lib"
# one thread per process and unbuffered output keep subprocess timings steady on 2 cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------------------------
# helpers: a private copy of the shared tiny run, trained-looking folders, damaged files


def copy_run(tiny_run, tmp_path: Path) -> Path:
    """tmp_path/runs/tiny: a copy of the session's tiny run (qa/, passages.jsonl, index/) to damage freely."""
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run.run_dir, run)
    return run


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (mtime_ns, sha256)} of every file under folder."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tiny_generator, retriever) -> Path:
    """The tiny generator and the retriever saved as plain folders, as final/ and checkpoints hold them."""
    d = tmp_path_factory.mktemp("saved-models")
    model, tok = tiny_generator
    model.save_pretrained(d / "generator")
    tok.save_pretrained(d / "generator")
    retriever.save(str(d / "retriever"))
    return d


def add_final(run: Path, models: Path) -> Path:
    """run/final/{generator,retriever,index}: what `ask` and `evaluate` load for a trained run."""
    from cozyrag_lib.models import retriever_identity

    final = run / "final"
    shutil.copytree(models / "generator", final / "generator")
    shutil.copytree(models / "retriever", final / "retriever")
    shutil.copytree(run / "index", final / "index")
    edit_json(final / "index" / "manifest.json", retriever=retriever_identity(str(final / "retriever")))
    return final


def add_checkpoint(run: Path, models: Path, cache: Path) -> Path:
    """run/checkpoints/last with the files `--resume` reads (models, state, optimizers, the same config)."""
    from cozyrag_lib.train_state import TrainState

    ckpt = RunPaths(run).checkpoint
    shutil.copytree(models / "generator", ckpt / "generator")
    shutil.copytree(models / "retriever", ckpt / "retriever")
    torch.save({**TrainState().to_dict(), "step": 2, "phase_step": 2, "rng": [], "world_size": 1}, ckpt / "state.pt")
    torch.save({"generator": {}, "retriever": {}}, ckpt / "optimizers.pt")
    (ckpt / "phase_data.json").write_text("null")
    # the config the command line below resolves to: resuming with another one would print a note
    load_config("tiny", out_root=str(run.parent), model_cache=str(cache)).save(ckpt / "config.json")
    return ckpt


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


SQUAD = {"version": "1.1", "data": [{"title": "Paris", "paragraphs": [{"context": "Paris is the capital of France.",
         "qas": [{"id": "q1", "question": "What is the capital of France?", "answers": [{"text": "Paris"}]}]}]}]}


def squad(mutate: Callable[[dict], object] = lambda d: None) -> str:
    doc = json.loads(json.dumps(SQUAD))
    mutate(doc)
    return json.dumps(doc, indent=1)


def qas(doc: dict) -> dict:
    return doc["data"][0]["paragraphs"][0]["qas"][0]


def bz2_cut(folder: Path) -> None:
    import bz2

    data = bz2.compress(b'<doc id="1" url="u" title="A">\nA\n\nSome text about A. ' + b"More. " * 200 + b"\n</doc>\n")
    write(folder / "AA" / "wiki_00.bz2", data[: len(data) // 2])


# ----------------------------------------------------------------------------------------------
# 1. the catalogue


@dataclass
class Case:
    id: str
    argv: list[str]  # {out} out_root, {run} run folder, {tmp} tmp_path, {cache} model cache
    setup: Callable[[Path, Path, SimpleNamespace], object]  # (run, tmp_path, ctx) -> None; writes the bad input
    expect: list[str]  # substrings of the one error line: the input's name first, then what is wrong
    subprocess: bool = False  # through `python -m cozyrag_lib` in a subprocess (the real exit status)


def nothing(run, tmp, ctx):
    pass


T = ["--preset=tiny", "--out_root={out}", "--model_cache={cache}"]  # the stage commands' common arguments
EVAL = ["evaluate", "--run", "base:{run}", "--qa", "{run}/qa/test.jsonl"]

CASES = [
    # --- prepare-qa: QA files that are empty, cut short, of the wrong shape or encoding ----------------------
    Case("qa-empty-file", ["prepare-qa", *T, "--qa_sources={tmp}/empty.json"],
         lambda r, t, c: write(t / "empty.json", b""), ["empty.json", "file is empty"]),
    Case("qa-squad-truncated", ["prepare-qa", *T, "--qa_sources={tmp}/cut.json"],
         lambda r, t, c: write(t / "cut.json", squad()[:150]), ["cut.json:", "not valid JSON"], subprocess=True),
    Case("qa-squad-qas-missing", ["prepare-qa", *T, "--qa_sources={tmp}/noqas.json"],
         lambda r, t, c: write(t / "noqas.json", squad(lambda d: d["data"][0]["paragraphs"][0].pop("qas"))),
         ["noqas.json", "data[0].paragraphs[0]: 'qas' missing"]),
    Case("qa-squad-answers-a-string", ["prepare-qa", *T, "--qa_sources={tmp}/ans.json"],
         lambda r, t, c: write(t / "ans.json", squad(lambda d: qas(d).update(answers="Paris"))),
         ["ans.json", "qas[0].answers: expected an array, got a string"]),
    Case("qa-squad-id-a-list", ["prepare-qa", *T, "--qa_sources={tmp}/id.json"],
         lambda r, t, c: write(t / "id.json", squad(lambda d: qas(d).update(id=[1]))),
         ["id.json", "qas[0].id: expected a string or a number, got an array"]),
    Case("qa-qabot-no-answers", ["prepare-qa", *T, "--qa_sources={tmp}/bot.txt"],
         lambda r, t, c: write(t / "bot.txt", "Q: Who wrote Hamlet?\n\nQ: Where is Paris?\n"),
         ["bot.txt", "question without an answer"]),
    Case("qa-tsv-blank-questions", ["prepare-qa", *T, "--qa_sources={tmp}/blank.tsv"],
         lambda r, t, c: write(t / "blank.tsv", "   \tShakespeare\n\t\tParis\n"), ["blank.tsv", "empty question"]),
    Case("qa-jsonl-blank-answers", ["prepare-qa", *T, "--qa_sources={tmp}/blank.jsonl"],
         lambda r, t, c: write(t / "blank.jsonl", '{"question": "Who?", "answer": "  "}\n'
                                                  '{"question": "Q?", "answers": []}\n'),
         ["blank.jsonl", "empty answer"]),
    Case("qa-huge-line", ["prepare-qa", *T, "--qa_sources={tmp}/huge.tsv"],
         lambda r, t, c: write(t / "huge.tsv", "Why? " * 20_000 + "\tbecause\n"), ["huge.tsv", "line too long"]),
    Case("qa-utf16-file", ["prepare-qa", *T, "--qa_sources={tmp}/excel.tsv"],
         lambda r, t, c: write(t / "excel.tsv", "Who?\tme\n".encode("utf-16")), ["excel.tsv", "binary file (NUL byte"]),
    Case("qa-a-folder", ["prepare-qa", *T, "--qa_sources={tmp}/qa_dir"],
         lambda r, t, c: (t / "qa_dir").mkdir(), ["qa_dir", "is a folder, not a QA file"]),
    Case("qa-wrong-format-named", ["prepare-qa", *T, "--qa_sources={tmp}/pairs.tsv", "--qa_format=squad"],
         lambda r, t, c: write(t / "pairs.tsv", "Who?\tme\n"), ["pairs.tsv:1", "not valid JSON"]),
    Case("qa-no-sources", ["prepare-qa", *T, "--qa_sources="], nothing, ["qa_sources", "is empty"]),
    Case("config-run-name-escapes", ["prepare-qa", *T, "--run_name=../escape"], nothing,
         ["run_name", "must be a plain folder name, got '../escape'"]),
    # config values checked before any file is read ({{ }}: a literal brace through the argv formatting)
    Case("config-prompt-template-unknown-placeholder", ["train", *T, "--prompt_template=Q: {{query}}\nA: "], nothing,
         ["prompt_template has an unknown placeholder {query} (known: {question}, {context})"]),
    Case("config-prompt-template-lone-brace", ["chunk", *T, "--prompt_template=Q: {{question"], nothing,
         ["prompt_template='Q: {question'", "write a literal brace as {{ or }}"]),
    Case("config-index-factory-unparsable-before-data", ["index", *T, "--index_factory=IVF,Flat"],
         lambda r, t, c: truncate(RunPaths(r).passages), ["index_factory='IVF,Flat'", "could not parse index string"],
         subprocess=True),  # the damaged passages are never read: the config is checked first
    # --- chunk ------------------------------------------------------------------------------------------------
    Case("chunk-no-sources", ["chunk", *T, "--corpus_sources="], nothing, ["corpus_sources", "is empty"]),
    Case("chunk-zero-passages", ["chunk", *T, "--max_articles=3", "--min_passage_chars=100000"], nothing,
         ["embedded", "no passages (3 articles read, every passage shorter than min_passage_chars=100000)"]),
    Case("chunk-truncated-bz2", ["chunk", *T, "--corpus_sources={tmp}/extracted"],
         lambda r, t, c: bz2_cut(t / "extracted"), ["wiki_00.bz2", "cannot read (Compressed file ended"],
         subprocess=True),
    Case("chunk-binary-jsonl", ["chunk", *T, "--corpus_sources={tmp}/image.jsonl"],
         lambda r, t, c: write(t / "image.jsonl", b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
         ["image.jsonl:1", "not UTF-8"]),
    Case("chunk-retriever-missing", ["chunk", *T, "--retriever={tmp}/no-retriever"], nothing,
         ["no-retriever", "retriever folder not found"]),
    # --- index ------------------------------------------------------------------------------------------------
    Case("index-passages-truncated", ["index", *T], lambda r, t, c: truncate(RunPaths(r).passages),
         ["passages.jsonl:", "not valid JSON; corrupt passages file? re-run chunking"], subprocess=True),
    Case("index-passages-binary", ["index", *T], lambda r, t, c: write(RunPaths(r).passages, b"\x00\xff" * 64),
         ["passages.jsonl:1", "not UTF-8"]),
    Case("index-passages-wrong-shape", ["index", *T],
         lambda r, t, c: write(RunPaths(r).passages, '{"id": 7, "title": "A", "text": "B"}\n'),
         ["passages.jsonl:1", "expected an object with string 'id', 'title' and 'text'"]),
    Case("index-factory-needs-more-passages", ["index", *T, "--index_factory=IVF9999,Flat"], nothing,
         ["index_factory='IVF9999,Flat'", "needs at least 9999 passages"]),
    Case("index-factory-unknown", ["index", *T, "--index_factory=Bogus"], nothing,
         ["index_factory='Bogus'", "faiss cannot build it"]),
    # --- train ------------------------------------------------------------------------------------------------
    Case("train-batch-larger-than-data", ["train", *T, "--batch_size=1000"], nothing,
         ["48 training QA pairs", "fewer than one global batch (1000 x 1 processes)"]),
    Case("train-negative-lr", ["train", *T, "--lr_retriever=-0.1"], nothing, ["lr_retriever", "must not be negative"]),
    Case("train-qa-damaged", ["train", *T], lambda r, t, c: truncate(r / "qa" / "train.jsonl", 0.37),
         ["train.jsonl:", "not valid JSON; rerun prepare-qa"]),
    Case("train-qa-extra-malformed", ["train", *T, "--qa_extra={tmp}/extra.json"],
         lambda r, t, c: write(t / "extra.json", '{"version": "1.1"}'), ["extra.json", "'data' missing"]),
    Case("train-index-other-retriever", ["train", *T],
         lambda r, t, c: edit_json(r / "index" / "manifest.json", retriever="sentence-transformers/all-mpnet-base-v2"),
         ["manifest.json", "was built for retriever sentence-transformers/all-mpnet-base-v2"]),
    Case("train-index-other-dim", ["train", *T], lambda r, t, c: edit_json(r / "index" / "manifest.json", dim=768),
         ["manifest.json", "built for dim 768", "retriever gives dim 384"]),
    Case("train-index-other-passages", ["train", *T],
         lambda r, t, c: write(RunPaths(r).passages, RunPaths(r).passages.read_text().replace("e", "E", 1)),
         ["passages.jsonl", "(the passages changed)"], subprocess=True),
    Case("train-index-missing", ["train", *T], lambda r, t, c: shutil.rmtree(r / "index"),
         ["manifest.json", "not found; build the index"]),
    Case("train-resume-checkpoint-weights-truncated", ["train", *T, "--resume"],
         lambda r, t, c: truncate(add_checkpoint(r, c.models, c.cache) / "generator" / "model.safetensors"),
         ["checkpoints/last/generator/model.safetensors", "damaged generator weights"]),
    Case("train-resume-state-garbage", ["train", *T, "--resume"],
         lambda r, t, c: write(add_checkpoint(r, c.models, c.cache) / "state.pt", b"not a checkpoint " * 8),
         ["checkpoints/last/state.pt", "damaged checkpoint (Weights only load failed)"]),
    Case("train-resume-state-truncated", ["train", *T, "--resume"],
         lambda r, t, c: truncate(add_checkpoint(r, c.models, c.cache) / "state.pt"),
         ["checkpoints/last/state.pt", "damaged checkpoint (PytorchStreamReader failed"]),
    Case("train-resume-checkpoint-config-missing", ["train", *T, "--resume"],
         lambda r, t, c: (add_checkpoint(r, c.models, c.cache) / "config.json").unlink(),
         ["checkpoints/last/config.json", "damaged checkpoint ([Errno 2] No such file"]),
    # --- ask --------------------------------------------------------------------------------------------------
    Case("ask-run-without-final", ["ask", "--run", "{run}", "Who was Ada Lovelace?"], nothing,
         ["final/", "no trained model"]),
    Case("ask-final-generator-truncated", ["ask", "--run", "{run}", "Who was Ada Lovelace?"],
         lambda r, t, c: truncate(add_final(r, c.models) / "generator" / "model.safetensors"),
         ["final/generator/model.safetensors", "damaged generator weights"], subprocess=True),
    Case("ask-final-retriever-truncated", ["ask", "--run", "{run}", "Who was Ada Lovelace?"],
         lambda r, t, c: truncate(add_final(r, c.models) / "retriever" / "model.safetensors", 0.9),
         ["final/retriever/model.safetensors", "damaged retriever weights"]),
    Case("ask-empty-question", ["ask", "--run", "base:{run}", "Who?", "   "], nothing, ["question 2", "is empty"]),
    Case("ask-top-k-zero", ["ask", "--run", "base:{run}", "--top_k=0", "Who?"], nothing,
         ["top_k must be positive, got 0"]),
    Case("ask-top-p-out-of-range", ["ask", "--run", "base:{run}", "--do_sample", "--top_p=1.5", "Who?"], nothing,
         ["top_p must be in (0, 1], got 1.5"]),
    Case("ask-temperature-zero", ["ask", "--run", "base:{run}", "--do_sample", "--temperature=0", "Who?"], nothing,
         ["temperature must be positive, got 0.0"]),
    Case("ask-run-config-unknown-key", ["ask", "--run", "base:{run}", "Who?"],
         lambda r, t, c: edit_json(r / "index" / "config.json", retrieval_mode="hybrid"),
         ["index/config.json", "unknown config key 'retrieval_mode'"]),
    Case("ask-run-config-not-json", ["ask", "--run", "base:{run}", "Who?"],
         lambda r, t, c: truncate(r / "index" / "config.json"), ["index/config.json", "not a valid config file"]),
    Case("ask-index-for-other-passages", ["ask", "--run", "base:{run}", "Who?"],
         lambda r, t, c: write(RunPaths(r).passages, RunPaths(r).passages.read_text().replace("a", "A", 1)),
         ["passages.jsonl", "(the passages changed)"]),
    # --- evaluate ---------------------------------------------------------------------------------------------
    Case("evaluate-run-without-final", ["evaluate", "--run", "{run}", "--qa", "{run}/qa/test.jsonl"], nothing,
         ["final/", "no trained model"]),
    Case("evaluate-qa-not-squad", ["evaluate", "--run", "base:{run}", "--qa", "{tmp}/dev.json"],
         lambda r, t, c: write(t / "dev.json", '{"version": "1.1", "questions": []}'), ["dev.json", "'data' missing"]),
    Case("evaluate-qa-wrong-format", [*EVAL, "--format", "tsv"], nothing,
         ["test.jsonl", "no usable QA pairs in this tsv file"]),
    Case("evaluate-qa-format-key", [*EVAL, "--qa_format=tsv"], nothing,  # prepare-qa's key is honoured, not ignored
         ["test.jsonl", "no usable QA pairs in this tsv file"]),
    Case("evaluate-format-and-key-disagree", [*EVAL, "--format", "tsv", "--qa_format=jsonl"], nothing,
         ["--format=tsv and --qa_format=jsonl disagree"]),
    Case("evaluate-negative-limit", [*EVAL, "--limit", "-1"], nothing, ["--limit", "must not be negative, got -1"]),
    Case("evaluate-sample-top-k-negative", [*EVAL, "--do_sample", "--sample_top_k=-1"], nothing,
         ["sample_top_k must not be negative (0 = no top-k cut), got -1"]),
    Case("evaluate-corpus-truncated", [*EVAL, "--corpus", "{tmp}/cut.jsonl"],
         lambda r, t, c: write(t / "cut.jsonl", RunPaths(r).passages.read_bytes()[:5000]),
         ["cut.jsonl:", "not valid JSON"]),
    # --- bench ------------------------------------------------------------------------------------------------
    Case("bench-unknown", ["bench", "indx"], nothing, ["indx", "unknown benchmark"]),
    Case("bench-option-not-a-number", ["bench", "index", *T, "--max_passages=many"], nothing,
         ["--max_passages='many'", "is not an integer"]),
    Case("bench-passages-truncated", ["bench", "index", *T], lambda r, t, c: truncate(RunPaths(r).passages),
         ["passages.jsonl:", "not valid JSON"]),
]


def test_the_catalogue_is_large_and_covers_every_command():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert {c.argv[0] for c in CASES} == {"prepare-qa", "chunk", "index", "train", "ask", "evaluate", "bench"}
    assert sum(c.subprocess for c in CASES) >= 5


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_error_and_touches_nothing(case: Case, tiny_run, saved_models, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    case.setup(run, tmp_path, SimpleNamespace(models=saved_models, cache=Path(tiny_run.model_cache)))
    before = snapshot(run)
    argv = [a.format(out=run.parent, run=run, tmp=tmp_path, cache=tiny_run.model_cache) for a in case.argv]
    if case.subprocess:
        proc = run_cli(*argv, env={"TOKENIZERS_PARALLELISM": "false"})
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        rc = main(argv)
        out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    for fragment in case.expect:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(run) == before  # no artefact replaced, touched or added


def test_debug_shows_the_traceback_for_a_library_error(tiny_run, saved_models, tmp_path, capsys):
    """--debug trades the one line for the full traceback (here through models.py's damaged-weights check)."""
    run = copy_run(tiny_run, tmp_path)
    truncate(add_final(run, saved_models) / "generator" / "model.safetensors")
    rc = main(["ask", "--run", str(run), "Who?", "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and "CozyError" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_an_intact_final_folder_answers(tiny_run, saved_models, tmp_path, capsys):
    """The trained-run layout the damaged-final cases start from does load and answer when intact."""
    run = copy_run(tiny_run, tmp_path)
    add_final(run, saved_models)
    assert main(["ask", "--run", str(run), "--json", "--top_k=2", "Who was Ada Lovelace?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["passages"]) == 2 and isinstance(out["answer"], str)


# ----------------------------------------------------------------------------------------------
# 2. SIGKILL during chunking or indexing, then a rerun


def kill_when(cmd: list[str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start cmd, SIGKILL it as soon as ready() holds; fail if it finished first."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the command finished before it could be killed"
        assert ready(), "timed out waiting for the command to start writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


@pytest.mark.slow
def test_chunking_killed_midway_keeps_the_old_passages_and_a_rerun_matches(tiny_run, tmp_path):
    run = tmp_path / "runs" / "tiny"
    old = '{"id": "old-0", "title": "Old", "text": "the passages of an earlier run"}\n'
    write(RunPaths(run).passages, old)
    cmd = [sys.executable, "-m", "cozyrag_lib", "chunk", "--preset=tiny", f"--out_root={run.parent}",
           f"--model_cache={tiny_run.model_cache}"]
    part = run / ".passages.parts" / "part-00000.jsonl"
    kill_when(cmd, part.exists)  # killed while chunking into its part file
    assert RunPaths(run).passages.read_text() == old  # the earlier artefact, whole
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # byte for byte what the uninterrupted (in-process) run of the session wrote; leftovers are cleaned up
    assert RunPaths(run).passages.read_bytes() == RunPaths(tiny_run.run_dir).passages.read_bytes()
    assert not (run / ".passages.parts").exists()


@pytest.mark.slow
def test_indexing_killed_midway_keeps_the_old_index_and_a_rerun_matches(tiny_run, tmp_path):
    from cozyrag_lib.index import build_index

    # 40 passages and batches of 4: short builds, but ten progress steps to be killed in
    lines = RunPaths(tiny_run.run_dir).passages.read_text().splitlines(keepends=True)[:40]
    args = dict(model_cache=str(tiny_run.model_cache), embed_batch_size=4)
    ref = load_config("tiny", out_root=str(tmp_path / "ref"), **args)
    write(RunPaths(ref.run_dir).passages, "".join(lines))
    build_index(ref)  # the uninterrupted build, in this process
    run = tmp_path / "runs" / "tiny"
    write(RunPaths(run).passages, "".join(lines))
    shutil.copytree(ref.run_dir / "index", run / "index")
    edit_json(run / "index" / "manifest.json", created="an earlier build")
    old = snapshot(run / "index")

    cmd = [sys.executable, "-m", "cozyrag_lib", "index", "--preset=tiny", f"--out_root={run.parent}",
           f"--model_cache={tiny_run.model_cache}", "--embed_batch_size=4"]
    log = tmp_path / "index.log"
    with open(log, "wb") as f:  # the embedding progress bar says when the long part has begun
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=f)
        try:
            deadline = time.time() + 300
            while b"embed:" not in log.read_bytes() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None and b"embed:" in log.read_bytes(), log.read_text()[-2000:]
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    assert snapshot(run / "index") == old  # the old index, every file as it was
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = run / "index"
    np.testing.assert_allclose(np.load(got / "embeddings.npy"), np.load(ref.run_dir / "index" / "embeddings.npy"),
                               atol=1e-5)
    m_ref, m_got = (json.loads((d / "index" / "manifest.json").read_text()) for d in (ref.run_dir, run))
    assert m_got["created"] != "an earlier build"
    assert {k: v for k, v in m_got.items() if k != "created"} == {k: v for k, v in m_ref.items() if k != "created"}
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


# ----------------------------------------------------------------------------------------------
# 3. torchrun: a dying rank, --max-restarts and --resume

FAULTY_TRAIN = '''
"""cozyrag_lib.train, except that rank 1 dies once (os._exit) right after the checkpoint of step {step}."""
import os
import sys
from pathlib import Path

from cozyrag_lib import distributed, train

save_checkpoint = train.save_checkpoint  # the loop looks it up in train's namespace


def save_then_die(run):
    save_checkpoint(run)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if run.state.step == {step} and distributed.get_rank() == 1 and first_attempt:
        Path({marker!r}).write_text("rank 1 died after step {step}")
        os._exit(1)


train.save_checkpoint = save_then_die
sys.exit(train.main())
'''


@pytest.mark.slow
def test_torchrun_rank_death_ends_cleanly_and_max_restarts_resumes(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    marker = tmp_path / "died"
    script = write(tmp_path / "faulty_train.py", FAULTY_TRAIN.format(step=2, marker=str(marker)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(script), "--preset=tiny", f"--out_root={run.parent}", f"--model_cache={tiny_run.model_cache}",
           "--phases=generator", "--max_steps_per_phase=4", "--checkpoint_every=2", "--eval_every=100",
           "--max_val_qa=4", "--batch_size=2", "--resume"]  # --resume: a restarted worker continues from the checkpoint
    # a timeout, not a hang: the launcher must notice the dead rank, stop the other one (blocked in a collective)
    # and start both again; without --max-restarts that same teardown ends the job with a non-zero status
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=420)
    assert marker.exists(), "the fault was never injected"
    assert r.returncode == 0, r.stderr[-4000:]
    # the first attempt found no checkpoint, the second did (or it would say so again) and went on from step 2
    assert r.stderr.count("starting from the beginning") == 1, r.stderr[-4000:]
    rows = [json.loads(line) for line in RunPaths(run).metrics.read_text().splitlines()]
    assert [x["step"] for x in rows if "loss" in x] == [1, 2, 3, 4]  # every step logged once
    state = torch.load(RunPaths(run).checkpoint / "state.pt", weights_only=True)
    assert state["step"] == 4 and len(state["rng"]) == 2


@pytest.mark.slow
def test_torchrun_rank_death_without_max_restarts_fails_fast_and_leaves_a_loadable_checkpoint(tiny_run, tmp_path):
    """No --max-restarts: the launcher notices the dead rank, stops the survivor (blocked in a collective, whose own
    timeout is 30 min) and exits non-zero within seconds; the checkpoint the dead rank saw written still loads."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM

    from cozyrag_lib.checkpoint import find_checkpoint, read_checkpoint_file, read_state

    run = copy_run(tiny_run, tmp_path)
    marker = tmp_path / "died"
    script = write(tmp_path / "faulty_train.py", FAULTY_TRAIN.format(step=2, marker=str(marker)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--preset=tiny", f"--out_root={run.parent}", f"--model_cache={tiny_run.model_cache}", "--phases=generator",
           "--max_steps_per_phase=4", "--checkpoint_every=2", "--eval_every=100", "--max_val_qa=4", "--batch_size=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # SIGTERM first: torchrun then stops its workers (each in its own session)
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail("torchrun still running 180 s after the start: a dead rank without --max-restarts hangs the job")
    ended = time.time()
    assert marker.exists(), "the fault was never injected"
    assert proc.returncode != 0, err[-4000:]
    assert ended - marker.stat().st_mtime < 60, "the launcher took too long to notice the dead rank"
    ckpt = find_checkpoint(RunPaths(run))
    assert ckpt is not None
    state, saved = read_state(ckpt)
    assert state.step == 2 and state.phase_index == 0 and len(saved["rng"]) == 2
    opts = read_checkpoint_file(ckpt / "optimizers.pt")
    assert opts["generator"]["state"] and set(opts) == {"generator", "retriever"}
    AutoModelForCausalLM.from_pretrained(ckpt / "generator")
    SentenceTransformer(str(ckpt / "retriever"), device="cpu")
    assert not (run / "final").exists()  # nothing claims the run finished


# ----------------------------------------------------------------------------------------------
# 4. offline and safe by default

NO_NETWORK = '''
"""Loaded at start-up (PYTHONPATH): every socket that is not AF_UNIX or loopback raises, and is logged."""
import os
import socket

LOG = os.environ["COZYRAG_NET_LOG"]
LOCAL = ("localhost", "127.", "::1", "0.0.0.0")


def note(what):
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()} {what}\\n")


def local(host):
    return host is None or str(host).startswith(LOCAL) or host == socket.gethostname()


def guard(sock_family, address):
    if sock_family == getattr(socket, "AF_UNIX", None) or not isinstance(address, tuple) or local(address[0]):
        return
    note(f"blocked connect {address!r}")
    raise OSError(f"network blocked in this test: {address!r}")


_connect, _connect_ex, _getaddrinfo, _create = (socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo,
                                                socket.create_connection)


def connect(self, address):
    guard(self.family, address)
    return _connect(self, address)


def connect_ex(self, address):
    guard(self.family, address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not local(host):
        note(f"blocked lookup {host!r}")
        raise socket.gaierror(f"name lookup blocked in this test: {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


def create_connection(address, *args, **kwargs):
    guard(socket.AF_INET, address)
    return _create(address, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.getaddrinfo, socket.create_connection = getaddrinfo, create_connection
note("loaded")
'''


@pytest.mark.slow
def test_tiny_pipeline_runs_with_the_network_blocked(tmp_path, model_cache):
    site = write(tmp_path / "site" / "sitecustomize.py", NO_NETWORK).parent
    log = tmp_path / "net.log"
    env = {**ENV, "COZYRAG_NET_LOG": str(log), "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # the library must switch itself
        env.pop(k, None)

    # the block works: a real request fails in the same environment
    fetch = "import urllib.request; urllib.request.urlopen('http://example.com', timeout=5)"
    probe = subprocess.run([sys.executable, "-c", fetch], env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "blocked in this test" in probe.stderr, probe.stderr[-2000:]
    log.unlink()

    run = tmp_path / "runs" / "tiny"
    common = ["--preset=tiny", f"--out_root={run.parent}", f"--model_cache={model_cache}", "--max_articles=40"]
    steps = [["prepare-qa", *common], ["chunk", *common], ["index", *common],
             ["train", *common, "--phases=generator", "--max_steps_per_phase=1", "--max_val_qa=2"],
             ["ask", "--run", str(run), "Who was Ada Lovelace?"]]
    driver = "import sys\nfrom cozyrag_lib.__main__ import main\nfor argv in %r:\n    if main(argv):\n" \
             "        sys.exit(f'{argv[0]} failed')\n" % steps  # one process: the imports are paid once
    r = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "A: " in r.stdout  # the trained run answered
    notes = log.read_text().splitlines()
    assert any(n.endswith(" loaded") for n in notes)  # the guard was in place
    assert [n for n in notes if "blocked" in n] == []  # and nothing even tried to reach the network

    # weights are written as safetensors, never as pickles
    for folder in [run / "final" / "generator", run / "final" / "retriever", RunPaths(run).checkpoint / "generator",
                   RunPaths(run).checkpoint / "retriever"]:
        files = [p.name for p in folder.rglob("*") if p.is_file()]
        assert any(f.endswith(".safetensors") for f in files), (folder, files)
        assert not any(f.endswith((".bin", ".pkl", ".pickle", ".pth")) for f in files), (folder, files)


def _calls(name: str):
    """(file, ast.Call) for every call of `name` (`torch.load`, `np.load`, ...) in the library."""
    for path in sorted(LIB.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield path.name, node


def _keyword(call: ast.Call, name: str):
    return next((ast.literal_eval(k.value) for k in call.keywords if k.arg == name), None)


def test_no_remote_code_and_no_pickled_code_by_default():
    from cozyrag_lib.config import Config

    assert Config().trust_remote_code is False
    for preset in ("tiny", "demo", "quality", "original", "hpc"):
        assert load_config(preset).trust_remote_code is False, preset
    remote = [(path.name, node.lineno) for path in sorted(LIB.rglob("*.py"))
              for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
              if isinstance(node, ast.keyword) and node.arg == "trust_remote_code"
              and isinstance(node.value, ast.Constant) and node.value.value is True]
    assert remote == []
    loads = list(_calls("torch.load"))
    assert loads, "no torch.load found: the check would be empty"
    assert [(f, c.lineno) for f, c in loads if _keyword(c, "weights_only") is not True] == []
    assert [(f, c.lineno) for f, c in _calls("np.load") if _keyword(c, "allow_pickle")] == []
    assert list(_calls("pickle.load")) == list(_calls("pickle.loads")) == []


def test_run_name_cannot_leave_out_root():
    from cozyrag_lib.errors import CozyError

    for name in ["../escape", "a/b", "..", ".", "", "/abs"]:
        with pytest.raises(CozyError, match="run_name must be a plain folder name"):
            load_config("tiny", run_name=name)
    assert load_config("tiny", run_name="ok-name_1").run_dir.name == "ok-name_1"


def test_models_load_error_names_the_damaged_file(saved_models, tmp_path):
    from cozyrag_lib.errors import CozyError
    from cozyrag_lib.models import load_generator

    gen = tmp_path / "generator"
    shutil.copytree(saved_models / "generator", gen)
    (gen / "config.json").write_text("{ not json")
    with pytest.raises(CozyError, match=r"generator '.*generator': cannot load"):
        load_generator(str(gen))
