"""`bench ask`: p50 / p95 latency of one-question `RAG.answer` calls on the run's questions, with the mean
retrieve / context / generate split.

    python -m cozyrag_lib bench ask --preset=demo --questions=50

Options: `--questions=50`, `--warmup=2`; `--precision=fp32` keeps the generator in fp32 where the run's
precision would answer with bf16 weights (see `RAG.load`).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from ..errors import CozyError
from ..models import holds_generator
from ..qa import read_qa
from ..rag import RAG
from .common import device_name, run_with_stages


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


def bench_ask(parsed) -> dict[str, Any]:
    """p50 / p95 latency of `RAG.answer` on single questions, with the retrieve / context / generate split.

    The run's trained models when `final/` holds them, else its base models (`base:RUN`); stages 1-3
    are built first when the run lacks them.
    """
    opts, overrides = parsed.options, parsed.overrides
    if opts["questions"] < 1:
        raise CozyError("bench ask: --questions must be at least 1")
    cfg = run_with_stages(parsed.config())
    trained = holds_generator(cfg.paths.final_generator)
    spec = ("" if trained else "base:") + str(cfg.run_dir)
    rag = RAG.load(spec, **{k: v for k, v in overrides.items() if k not in ("out_root", "run_name")})
    questions = bench_questions(cfg, opts["warmup"] + opts["questions"])
    if len(questions) <= opts["warmup"]:
        raise CozyError(f"bench ask: {cfg.paths.qa} has {len(questions)} questions, need more than "
                        f"--warmup={opts['warmup']}")
    weight = next(rag.generator.parameters())
    for q in questions[:opts["warmup"]]:  # thread pools, allocator, kernel choice
        rag.answer(q)
    wall, parts, words, tokens = [], {"retrieve_s": [], "context_s": [], "generate_s": []}, [], []
    for q in tqdm(questions[opts["warmup"]:], desc="bench ask", unit="question"):
        t0 = time.perf_counter()
        out = rag.answer(q)
        wall.append(time.perf_counter() - t0)
        for k in parts:
            parts[k].append(out["timings"][k])
        words.append(len(out["answer"].split()))
        tokens.append(len(rag.tokenizer(out["answer"], add_special_tokens=False)["input_ids"]))
    p50, p95 = np.percentile(wall, [50, 95])
    return {"benchmark": "ask", "run": rag.name, "generator": rag.cfg.generator, "questions": len(wall),
            "p50_s": round(float(p50), 4), "p95_s": round(float(p95), 4), "mean_s": round(float(np.mean(wall)), 4),
            **{k: round(float(np.mean(v)), 4) for k, v in parts.items()},
            "answer_words_mean": round(float(np.mean(words)), 2), "answer_tokens_mean": round(float(np.mean(tokens)), 2),
            "top_k": rag.cfg.top_k, "max_new_tokens": rag.cfg.max_new_tokens, "index_factory": rag.pindex.manifest.get(
                "index_factory"), "passages": len(rag.pindex), "device": device_name(weight.device),
            "generator_dtype": str(weight.dtype).removeprefix("torch.")}
