"""`bench ask`: p50 / p95 latency of one-question `RAG.answer` calls on the run's questions, with the mean
retrieve / context / generate split, for the run's answering path and a reference path side by side.

    python -m cozyrag_lib bench ask --preset=demo --questions=50

The reference is the same run loaded with `answer_quantization=--reference` (default none: the generator
unquantised, in bf16 where `precision` makes it so), `prompt_lookup=--reference_prompt_lookup` (default 0:
one token per forward pass) and `sentence_vectors=false` (context sentences encoded at each question): the
answering path before int8 weights, prompt lookup and stored sentence vectors. The two answer
each question in turn, the order alternating, so the ratios come from one run. `answers_agree` is the share of questions both paths answer
with the same text. Options: `--questions=50`, `--warmup=2`, `--reference=none` (empty: the run's path
alone), `--reference_prompt_lookup=0`; `--precision=fp32` keeps the unquantised generator in fp32 (see `RAG.load`).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from ..errors import CozyError
from ..models import holds_generator
from ..qa import read_qa
from ..quantize import is_int8
from ..rag import RAG
from .common import device_name, run_with_stages

PARTS = ("retrieve_s", "context_s", "generate_s")


def bench_questions(cfg, n: int) -> list[str]:
    """`n` distinct questions of the run's QA (validation first, then test, then train)."""
    out: dict[str, None] = {}
    for split in ("validation", "test", "train"):
        path = cfg.paths.qa_split(split)
        for it in read_qa(path) if path.is_file() else []:
            out.setdefault(it["question"], None)
            if len(out) == n:
                return list(out)
    return list(out)


def generator_kind(rag: RAG) -> str:
    """"int8" for a generator with int8 weights (`quantize.Int8Linear`), else its weights' dtype ("bfloat16", "float32")."""
    if is_int8(rag.generator):
        return "int8"
    return str(next(rag.generator.parameters()).dtype).removeprefix("torch.")


def latency(wall: list[float], parts: dict[str, list[float]], prefix: str = "") -> dict[str, float]:
    p50, p95 = np.percentile(wall, [50, 95])
    out = {"p50_s": float(p50), "p95_s": float(p95), "mean_s": float(np.mean(wall)),
           **{k: float(np.mean(v)) for k, v in parts.items()}}
    return {prefix + k: round(v, 4) for k, v in out.items()}


def bench_ask(parsed) -> dict[str, Any]:
    """p50 / p95 latency of `RAG.answer` on single questions, with the retrieve / context / generate split,
    for the run's path and (with --reference) a reference path, question by question in turn.

    The run's trained models when `final/` holds them, else its base models (`base:RUN`); stages 1-3
    are built first when the run lacks them.
    """
    opts, overrides = parsed.options, parsed.overrides
    if opts["questions"] < 1:
        raise CozyError("bench ask: --questions must be at least 1")
    cfg = run_with_stages(parsed.config())
    trained = holds_generator(cfg.paths.final_generator)
    spec = ("" if trained else "base:") + str(cfg.run_dir)
    load_kw = {k: v for k, v in overrides.items() if k not in ("out_root", "run_name")}
    paths = {"run": RAG.load(spec, **load_kw)}
    if opts["reference"]:
        paths["reference"] = RAG.load(spec, **{**load_kw, "answer_quantization": opts["reference"],
                                               "prompt_lookup": opts["reference_prompt_lookup"],
                                               "sentence_vectors": False})
    questions = bench_questions(cfg, opts["warmup"] + opts["questions"])
    if len(questions) <= opts["warmup"]:
        raise CozyError(f"bench ask: {cfg.paths.qa} has {len(questions)} questions, need more than "
                        f"--warmup={opts['warmup']}")
    for q in questions[:opts["warmup"]]:  # thread pools, allocator, kernel choice
        for rag in paths.values():
            rag.answer(q)
    wall = {name: [] for name in paths}
    parts = {name: {k: [] for k in PARTS} for name in paths}
    answers: dict[str, list[str]] = {name: [] for name in paths}
    tokens = []
    for i, q in enumerate(tqdm(questions[opts["warmup"]:], desc="bench ask", unit="question")):
        for name in (list(paths) if i % 2 == 0 else list(paths)[::-1]):  # neither path always goes first
            t0 = time.perf_counter()
            out = paths[name].answer(q)
            wall[name].append(time.perf_counter() - t0)
            for k in PARTS:
                parts[name][k].append(out["timings"][k])
            answers[name].append(out["answer"])
        rag = paths["run"]
        tokens.append(len(rag.tokenizer(answers["run"][-1], add_special_tokens=False)["input_ids"]))
    rag = paths["run"]
    result = {"benchmark": "ask", "run": rag.name, "generator": rag.cfg.generator, "questions": len(wall["run"]),
              "answer_quantization": rag.cfg.answer_quantization, "prompt_lookup": rag.cfg.prompt_lookup,
              "sentence_vectors": rag.sentences.stored is not None,
              "generator_weights": generator_kind(rag),
              **latency(wall["run"], parts["run"]),
              "answer_words_mean": round(float(np.mean([len(a.split()) for a in answers["run"]])), 2),
              "answer_tokens_mean": round(float(np.mean(tokens)), 2)}
    if "reference" in paths:
        ref = latency(wall["reference"], parts["reference"], "reference_")
        result.update({"reference_answer_quantization": opts["reference"],
                       "reference_prompt_lookup": paths["reference"].cfg.prompt_lookup,
                       "reference_sentence_vectors": paths["reference"].sentences.stored is not None,
                       "reference_generator_weights": generator_kind(paths["reference"]), **ref,
                       "p50_ratio": round(result["p50_s"] / ref["reference_p50_s"], 4),
                       "p95_ratio": round(result["p95_s"] / ref["reference_p95_s"], 4),
                       "answers_agree": round(float(np.mean([a == b for a, b in zip(answers["run"],
                                                                                   answers["reference"])])), 4)})
    result.update({"top_k": rag.cfg.top_k, "max_new_tokens": rag.cfg.max_new_tokens,
                   "index_factory": rag.pindex.manifest.get("index_factory"), "passages": len(rag.pindex),
                   "device": device_name(rag.device)})
    return result
