"""Promises that had no test (issue 14): offline loads in-process, query_only end to end, prompts that keep their
answer cue, config values checked before any file is read, CUDA asked for on a machine without one, and the
sbatch template's torchrun line run for real.

Bad-input cases that fit the catalogue (one CLI line, one error line) are in tests/test_robustness.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from cozyrag_lib.__main__ import main
from cozyrag_lib.config import load_config
from cozyrag_lib.errors import CozyError
from cozyrag_lib.paths import RunPaths

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}


def one_error_line(capsys) -> str:
    """The single `error: ...` line a failed in-process CLI call printed (and no traceback)."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert "Traceback" not in out + err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# embedded and local specs load offline inside the process, whatever was imported first

OFFLINE_PROBE = r'''
import json, os, socket, sys

for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.pop(k, None)
tries = []


def blocked(what):
    tries.append(what)
    raise OSError(f"network blocked in this test: {what}")


socket.socket.connect = lambda self, address: blocked(repr(address))
socket.socket.connect_ex = lambda self, address: blocked(repr(address))
socket.getaddrinfo = lambda host, *a, **k: blocked(f"lookup {host!r}")
socket.create_connection = lambda address, *a, **k: blocked(repr(address))

# the Hugging Face libraries first, as a notebook or a script that imported them already would have them
import huggingface_hub.constants as hub
import transformers
from sentence_transformers import SentenceTransformer

loads = []  # (entry point, offline?) for every model, tokenizer and config load


def spy(owner, name):
    original = getattr(owner, name)

    def wrapper(*args, **kw):
        loads.append((f"{owner.__name__}.{name}", bool(kw.get("local_files_only")) or hub.HF_HUB_OFFLINE))
        return original(*args, **kw)

    setattr(owner, name, wrapper)


for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
    spy(cls, "from_pretrained")
init = SentenceTransformer.__init__


def st_init(self, *args, **kw):
    loads.append(("SentenceTransformer", bool(kw.get("local_files_only")) or hub.HF_HUB_OFFLINE))
    init(self, *args, **kw)


SentenceTransformer.__init__ = st_init

from cozyrag_lib.chunking import load_retriever_tokenizer
from cozyrag_lib.models import load_generator, load_retriever

load_generator("tiny:gpt2", sys.argv[1])  # builds the tiny GPT-2 in this fresh cache, then loads it
load_retriever("embedded:all-minilm-l6-v2", device="cpu")
load_retriever_tokenizer("embedded:all-minilm-l6-v2")
print(json.dumps({"tries": tries, "loads": loads}))
'''


def test_local_specs_load_offline_in_process_with_the_network_blocked(tmp_path, model_cache, tiny_generator):
    cache = tmp_path / "models"  # a fresh cache: the tiny GPT-2 is built here (SmolLM2's conversion is reused)
    cache.mkdir()
    (cache / "smollm2-135m-instruct").symlink_to(Path(model_cache) / "smollm2-135m-instruct")
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    r = subprocess.run([sys.executable, "-c", OFFLINE_PROBE, str(cache)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["tries"] == []  # nothing even tried to reach the network
    entries = {name for name, _ in got["loads"]}
    assert {"AutoTokenizer.from_pretrained", "AutoModelForCausalLM.from_pretrained", "SentenceTransformer"} <= entries
    assert [name for name, offline in got["loads"] if not offline] == []  # every load was an offline one


# ----------------------------------------------------------------------------------------------
# query_only: the question side trains, the passage side (index and context sentences) stays the base retriever's


@pytest.mark.slow
def test_query_only_keeps_the_passage_side_and_answers_with_it(tiny_run, retriever):
    from test_train import read_metrics, run_training

    from cozyrag_lib.embedding import embed_texts
    from cozyrag_lib.rag import RAG

    run_dir = run_training(tiny_run, "query-only", "--query_only=true", "--phases=retriever,generator",
                           "--batch_size=4")
    paths, stage3 = RunPaths(run_dir), RunPaths(tiny_run.run_dir)
    manifest = json.loads((paths.final_index / "manifest.json").read_text())
    stage3_manifest = json.loads((stage3.index / "manifest.json").read_text())
    assert manifest["passage_encoder"] == stage3_manifest["retriever"] == "embedded:all-minilm-l6-v2"
    assert manifest["version"] == stage3_manifest["version"]  # no refresh after the retriever phase
    assert np.array_equal(np.load(paths.final_index / "embeddings.npy"), np.load(stage3.index / "embeddings.npy"))
    assert {row["index_version"] for row in read_metrics(run_dir) if "index_version" in row} == {stage3_manifest["version"]}

    rag = RAG.load(run_dir)
    out = rag.answer("Who was Ada Lovelace?", top_k=2)
    pid = out["passages"][0]["id"]
    sentences = rag.sentences.sentences[pid]
    base = embed_texts(retriever, sentences, show_progress=False)
    trained = embed_texts(rag.retriever, sentences, show_progress=False)
    assert not np.allclose(trained, base, atol=1e-5)  # the question side did train: the two sides differ
    # sentences: the frozen passage side, read from the stored vectors the final index carries over from stage 3
    np.testing.assert_allclose(rag.sentences.embeddings[pid], base, atol=2e-3)  # float16 storage
    assert rag.sentences.retriever is not rag.retriever
    assert rag.sentences.encoded == 0 and rag.sentences.reused >= len(sentences)
    assert np.array_equal(np.load(paths.final_index / "sentences.npy"), np.load(stage3.index / "sentences.npy"))


# ----------------------------------------------------------------------------------------------
# a question longer than max_length: the prompt keeps its answer cue, the question its start and end


@pytest.mark.parametrize("template,cue", [
    ("Q: {question}\nContext:\n{context}\nA: ", "\nA: "),
    ("Context: {context}\nQuestion: {question}\nAnswer: ", "\nAnswer: "),
])
def test_a_question_longer_than_max_length_keeps_the_answer_cue(tiny_generator, template, cue):
    from cozyrag_lib.retrieval import encode_example

    tok = tiny_generator[1]
    question = "Who among the playwrights " + "of that long and crowded age " * 40 + "wrote Hamlet?"
    ex = encode_example(tok, question, "Shakespeare wrote Hamlet. " * 10, "William Shakespeare", template, max_length=64)
    assert len(ex["prompt_ids"]) + len(ex["answer_ids"]) <= 64
    prompt = tok.decode(ex["prompt_ids"])
    assert prompt.endswith(cue), prompt[-40:]
    assert "Who among the playwrights" in prompt and "wrote Hamlet?" in prompt  # the middle went, not the ends
    assert ex["answer_ids"][-1] == tok.eos_token_id


def test_the_chat_prompt_keeps_its_assistant_turn(tiny_generator):
    from cozyrag_lib.retrieval import encode_example

    tok = tiny_generator[1]
    ex = encode_example(tok, "Why " + "indeed " * 200 + "?", "ctx " * 50, "Because.", "chat", max_length=96)
    assert len(ex["prompt_ids"]) + len(ex["answer_ids"]) <= 96
    assert tok.decode(ex["prompt_ids"]).rstrip().endswith("assistant")


# ----------------------------------------------------------------------------------------------
# config values checked without data: the template's placeholders, sampling, the index factory


@pytest.mark.parametrize("key,value,expect", [
    ("prompt_template", "Q: {query}\nA: ", "prompt_template has an unknown placeholder {query} (known: {question}, "
                                          "{context})"),
    ("prompt_template", "Q: {}\nA: ", "unknown placeholder {}"),
    ("prompt_template", "Q: {question.upper}\nA: ", "unknown placeholder {question.upper}"),
    ("prompt_template", "Q: {question}\nContext: {context\nA: ", "(write a literal brace as {{ or }})"),  # Python's
    ("prompt_template", "Q: {question} }\nA: ", "(write a literal brace as {{ or }})"),  # words vary by version
    ("top_p", 0, "top_p must be in (0, 1], got 0.0"),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("sample_top_k", -1, "sample_top_k must not be negative (0 = no top-k cut), got -1"),
    ("temperature", 0, "temperature must be positive, got 0.0"),
    ("index_factory", "IVF,Flat", "index_factory='IVF,Flat': faiss cannot build it (could not parse"),
    ("index_factory", "HNSW32,Flat,Flat", "index_factory='HNSW32,Flat,Flat': faiss cannot build it"),
])
def test_config_rejects_nonsense_in_one_line(key, value, expect):
    with pytest.raises(CozyError) as e:
        load_config("tiny", **{key: value})
    assert expect in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


@pytest.mark.parametrize("key,value", [
    ("prompt_template", "Question: {question}\nAnswer: "), ("prompt_template", "{context} | {question} ="),
    ("prompt_template", "chat"), ("prompt_template", "{{literal}} {question!r:>5}\nA: "),
    ("top_p", 1.0), ("sample_top_k", 0), ("index_factory", "HNSW32"), ("index_factory", "IVF1024,PQ48"),
    ("index_factory", "IVF16,PQ7"),  # fits no 384-dim retriever, but that is the index stage's to say
])
def test_config_accepts_sensible_values(key, value):
    assert getattr(load_config("tiny", **{key: value}), key) == value


def test_a_bad_factory_is_reported_before_the_passages_are_read(tiny_run, tmp_path, capsys):
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run.run_dir / "passages", run / "passages")
    RunPaths(run).passages.write_bytes(b"\x00 not passages")  # a second problem, which must not mask the first
    argv = ["index", "--preset=tiny", f"--out_root={run.parent}", f"--model_cache={tiny_run.model_cache}",
            "--index_factory=IVF,Flat"]
    assert main(argv) == 2
    assert "index_factory='IVF,Flat'" in one_error_line(capsys)


# ----------------------------------------------------------------------------------------------
# --device=cuda without a CUDA GPU: one line, from every command that places models


@pytest.mark.parametrize("command", ["index", "train", "ask"])
def test_cuda_without_a_gpu_is_one_line(command, tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine has no GPU, whatever it has
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run.run_dir, run)
    stage = ["--preset=tiny", f"--out_root={run.parent}", f"--model_cache={tiny_run.model_cache}", "--device=cuda"]
    argv = {"index": ["index", *stage], "train": ["train", *stage],
            "ask": ["ask", "--run", f"base:{run}", "--device=cuda", "Who was Ada Lovelace?"]}[command]
    assert main(argv) == 2
    assert one_error_line(capsys) == ("error: config: device=cuda but no CUDA GPU is available "
                                      "(use --device=cpu, or auto)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_through_the_real_command_line(tiny_run, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cozyrag_lib", "ask", "--run", f"base:{tiny_run.run_dir}",
                        "--device=cuda", "Who?"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: config: device=cuda but no CUDA GPU is available (use --device=cpu, or auto)"], r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# the sbatch template: its output folder exists, and its torchrun line runs (2 gloo processes, 1 node)

SBATCH = ROOT / "sbatch" / "cozyrag.sbatch"


def torchrun_line(template: str) -> str:
    """The `srun torchrun ...` command of the template, continuation lines joined, without `srun`."""
    text = template.replace("\\\n", " ")
    [line] = [ln for ln in text.splitlines() if ln.startswith("srun torchrun")]
    return line.removeprefix("srun ").strip()


def test_the_sbatch_output_folder_exists_and_every_torchrun_has_a_rendezvous():
    template = SBATCH.read_text()
    [output] = re.findall(r"^#SBATCH --output=(\S+)", template, flags=re.M)
    assert (ROOT / output).parent.is_dir(), f"SLURM does not create {Path(output).parent}/"
    for line in template.replace("\\\n", " ").splitlines():  # comments included: they are commands to copy
        if re.search(r"\btorchrun\b.*-m cozyrag_lib", line):
            assert "--rdzv_endpoint" in line and "--nnodes" in line, line


@pytest.mark.slow
def test_the_sbatch_torchrun_line_runs_the_index_stage_on_two_processes(tiny_run, tmp_path):
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run.run_dir / "passages", run / "passages")
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slurm = {"SLURM_NNODES": "1", "GPUS": "2", "MASTER": "127.0.0.1", "PORT": str(port), "SLURM_JOB_ID": "test-1",
             "STAGE": "index", "PRESET": "tiny", "RESUME": "",
             "EXTRA": f"--out_root={run.parent} --model_cache={tiny_run.model_cache} --device=cpu",
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # torchrun of this Python
    r = subprocess.run(["bash", "-c", torchrun_line(SBATCH.read_text())], cwd=ROOT, env={**ENV, **slurm},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["passages"] == len(RunPaths(run).passages.read_text().splitlines())
    np.testing.assert_allclose(np.load(run / "index" / "embeddings.npy"),
                               np.load(tiny_run.run_dir / "index" / "embeddings.npy"), atol=1e-5)
