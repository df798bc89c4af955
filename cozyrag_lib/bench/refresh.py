"""`bench refresh`: what the index refresh after a retriever phase costs and what it buys, strategy by strategy.

On a trained run (the default): the run's trained retriever (final/retriever) is the new encoder, the stage-3
index (index/) holds the stale passage vectors. For each strategy, validation and test recall@1 / recall@5
(train_eval's val_recall@k: `evidence_recall`, dense retrieval), its seconds and the passages it embedded:
  * stale      no refresh: the new query encoder against the old passage vectors (refresh=none);
  * full       every passage re-embedded, the index rebuilt (refresh=full);
  * retrieved  only the union of the top --top_n passages of the run's training and validation questions,
               found by the new query encoder in the stale index, and their gold passages, re-embedded and
               written into the matrix, the index rebuilt (refresh=retrieved, training's own functions); the
               validation questions are among those it re-embeds for, the test questions are not;
  * rerank     Atlas-style, at query time: the stale index's top --rerank_n passages of each question
               re-embedded and re-scored, the best 5 kept (its seconds are for all the questions it answered,
               and grow with them; the passages of questions that share candidates are embedded once).

    python -m cozyrag_lib bench refresh --preset=quality --run_name=squad_q --threads=2

With `--n=N` (e.g. 1000000): time and memory at N passages, without embedding N (an hour and more on a CPU).
Measured: embedding throughput on `--sample` corpus-like texts (the run's passages with a few words swapped),
the Flat index over N unit vectors (the run's stage-3 embeddings tiled with Gaussian noise, as `bench scale`
makes them) built, searched with `--questions` question vectors (the run's training questions embedded by the
new encoder, noisy copies where there are fewer) for their top --top_n, the union counted, its rows
overwritten and the index rebuilt; bytes and RSS. Extrapolated (the key says so): the embedding seconds of
N passages (N / passages per second) and of the union, and the refresh totals built from them (the question
embedding too, where --questions exceeds the run's training questions). The synthetic corpus has no gold
passages: training's retrieved refresh adds those of its items (at most one per question) to the union.

    python -m cozyrag_lib bench refresh --preset=quality --run_name=squad_q --n=1000000 --threads=2

Options: `--top_n=0` (0 = the config's refresh_top_n), `--rerank_n=100`, `--n=0` (0 = on the run),
`--sample=2000`, `--questions=10000`, `--noise=1.0`.
"""
from __future__ import annotations

import resource
import time
from typing import Any

import numpy as np

from .. import distributed
from ..chunking import read_passages
from ..embedding import embed_corpus, embed_texts, embedding_dim, passage_texts
from ..errors import CozyError
from ..index import PassageIndex, make_faiss_index
from ..models import autocast, load_retriever, use_bf16
from ..qa import read_qa, seeded_sample
from ..retrieval import gold_passages
from ..train_data import load_train_items
from ..train_eval import evidence_recall, reembed_rows, refresh_rows, refresh_targets
from .common import Stopwatch, device_name
from .scale import scale_vectors

K = 5  # recall@1 and recall@5: the top 5 of each question


def rounded(d: dict, digits: int = 4) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in d.items()}


def recalls(sets: dict[str, tuple[list[dict], np.ndarray]], passages: list[dict], ids_of) -> dict[str, float]:
    """{"val_recall@1", "val_recall@5", "test_recall@1", ...}: `ids_of(question embeddings)` -> (n, >= 5) rows."""
    out = {}
    for name, (items, q) in sets.items():
        r = evidence_recall(items, passages, ids_of(q))
        out[f"{name}_recall@1"], out[f"{name}_recall@5"] = r["recall@1"], r["recall@5"]
    return out


def rerank_ids(q: np.ndarray, candidates: np.ndarray, rows: np.ndarray, fresh: np.ndarray, k: int) -> np.ndarray:
    """(n, k) rows: each question's `candidates` (n, R; -1 = none) re-scored by its inner product with their
    `fresh` vectors (row rows[j] -> fresh[j], `rows` sorted), best first (ties keep the stale order)."""
    out = np.full((len(q), k), -1, np.int64)
    for i, cand in enumerate(candidates):
        cand = cand[cand >= 0]
        scores = fresh[np.searchsorted(rows, cand)] @ q[i]  # (R,)
        best = cand[np.argsort(-scores, kind="stable")[:k]]
        out[i, :len(best)] = best
    return out


def synthetic_texts(texts: list[str], n: int, rng: np.random.Generator, swap: float = 0.05) -> list[str]:
    """`n` corpus-like texts: passages of `texts` drawn at random, a `swap` share of their words replaced by
    words of other passages (lengths stay the corpus', the texts are not copies)."""
    vocab = " ".join(texts[i] for i in rng.choice(len(texts), min(len(texts), 200), replace=False)).split()
    out = []
    for i in rng.integers(0, len(texts), n):
        words = texts[i].split()
        for j in rng.choice(len(words), int(len(words) * swap), replace=False) if words else ():
            words[j] = vocab[rng.integers(len(vocab))]
        out.append(" ".join(words))
    return out


def memory() -> dict[str, int]:
    import psutil

    return {"rss_bytes": psutil.Process().memory_info().rss,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ----------------------------------------------------------------------------------------------
# on the run


def on_run(cfg, opts, device, retriever, top_n: int) -> dict[str, Any]:
    """The four strategies on the run's passages, validation and test questions (see the module docstring)."""
    paths, bs = cfg.paths, cfg.embed_batch_size
    stale = PassageIndex.load(paths.index, paths.passages, expected_dim=embedding_dim(retriever))
    passages, texts = stale.passages, passage_texts(stale.passages)
    items = load_train_items(cfg)
    val = seeded_sample(read_qa(paths.qa_split("validation")), cfg.max_val_qa, cfg.seed)  # as training samples it
    test = seeded_sample(read_qa(paths.qa_split("test")), cfg.max_eval_qa, cfg.seed)  # as notebook 05 does
    watch = Stopwatch(device)
    with autocast(cfg.precision, device):
        embed_texts(retriever, texts[:bs], bs, show_progress=False)  # warm-up: thread pools, kernel choice
        with watch("question_embed"):
            sets = {name: (its, embed_texts(retriever, [it["question"] for it in its], bs, show_progress=False))
                    for name, its in (("val", val), ("test", test)) if its}
        strategies: dict[str, dict] = {}
        strategies["stale"] = {**recalls(sets, passages, lambda q: stale.search(q, K)[1]), "seconds": 0.0,
                               "passages_embedded": 0}

        with watch("full_embed"):
            emb = embed_corpus(retriever, texts, bs)  # (N, d)
        with watch("full_index"):
            full = make_faiss_index(emb, cfg.index_factory, cfg.nprobe, cfg.ef_search)
        del emb
        s = watch.seconds
        strategies["full"] = {**recalls(sets, passages, lambda q: full.search(q, K)[1]),
                              "seconds": s["full_embed"] + s["full_index"], "passages_embedded": len(texts),
                              "embed_s": s["full_embed"], "index_s": s["full_index"]}
        del full

        gold = gold_passages(items, passages)  # training has these already (Run.gold): not timed
        questions, gold_rows = refresh_targets(cfg, items, gold, val, passages)
        with watch("retrieved_select"):
            rows = refresh_rows(retriever, stale, questions, gold_rows, top_n, bs)
        with watch("retrieved_embed"):
            emb = reembed_rows(retriever, stale, rows, bs)  # a copy: the stage-3 matrix is memory-mapped
        with watch("retrieved_index"):
            part = make_faiss_index(emb, cfg.index_factory, cfg.nprobe, cfg.ef_search)
        del emb
        strategies["retrieved"] = {**recalls(sets, passages, lambda q: part.search(q, K)[1]),
                                   "seconds": s["retrieved_select"] + s["retrieved_embed"] + s["retrieved_index"],
                                   "passages_embedded": len(rows), "select_s": s["retrieved_select"],
                                   "embed_s": s["retrieved_embed"], "index_s": s["retrieved_index"],
                                   "questions": len(questions), "gold_passages": len(set(gold_rows))}
        del part

        embedded = []  # passages re-embedded for each question set

        def rerank(q: np.ndarray) -> np.ndarray:
            with watch("rerank"):
                _, cand = stale.search(q, opts["rerank_n"])  # (n, R)
                rows = np.unique(cand[cand >= 0])
                fresh = embed_texts(retriever, [texts[i] for i in rows], bs, show_progress=False)  # (U, d)
                embedded.append(len(rows))
                return rerank_ids(q, cand, rows, fresh, K)

        n_questions = sum(len(its) for its, _ in sets.values())
        strategies["rerank"] = {**recalls(sets, passages, rerank), "seconds": s.get("rerank", 0.0),
                                "passages_embedded": sum(embedded), "passages_per_question": opts["rerank_n"],
                                "questions": n_questions,
                                "ms_per_question": 1000 * s.get("rerank", 0.0) / max(1, n_questions)}
    return {"mode": "run", "run": str(cfg.run_dir), "retriever": str(paths.final_retriever),
            "stale_vectors": f"{paths.index}/embeddings.npy (retriever {stale.manifest.get('retriever')}, "
                             f"version {stale.manifest.get('version', 0)})",
            "passages": len(passages), "val_questions": len(val), "test_questions": len(test),
            "train_questions": len(items), "top_n": top_n, "rerank_n": opts["rerank_n"], "k": K,
            "retrieval": "dense", "index_factory": cfg.index_factory,
            "question_embed_s": round(watch.seconds["question_embed"], 3),
            "strategies": {name: rounded(r) for name, r in strategies.items()}}


# ----------------------------------------------------------------------------------------------
# at scale


def at_scale(cfg, opts, device, retriever, retriever_name: str, top_n: int) -> dict[str, Any]:
    """Mode --n: measured throughput, FAISS and union parts at n; extrapolated embedding totals."""
    import faiss

    paths, bs, n = cfg.paths, cfg.embed_batch_size, opts["n"]
    if not (paths.passages.is_file() and paths.passages.stat().st_size):
        raise CozyError(f"bench refresh: {paths.passages}: not found or empty; run the chunk stage first")
    if opts["sample"] < 1 or opts["questions"] < 1:
        raise CozyError("bench refresh: --sample and --questions must be at least 1")
    rng = np.random.default_rng(cfg.seed)
    corpus = passage_texts(read_passages(paths.passages))
    texts = synthetic_texts(corpus, opts["sample"], rng)
    items = load_train_items(cfg)
    questions = [it["question"] for it in items][:opts["questions"]]
    watch = Stopwatch(device)
    with autocast(cfg.precision, device):
        embed_texts(retriever, texts[:bs], bs, show_progress=False)  # warm-up
        with watch("sample_embed"):
            embed_texts(retriever, texts, bs, show_progress=False)
        with watch("question_embed"):
            q = embed_texts(retriever, questions, bs, show_progress=False)  # (Qr, d)
    passages_per_s = len(texts) / watch.seconds["sample_embed"]
    questions_per_s = len(questions) / watch.seconds["question_embed"]
    if len(q) < opts["questions"]:  # more questions than the run has: noisy copies of its own
        q = np.concatenate([q, scale_vectors(q, opts["questions"] - len(q), opts["noise"], cfg.seed + 2)])

    emb_path = paths.index / "embeddings.npy"
    base = np.load(emb_path) if emb_path.is_file() else None
    with watch("make_vectors"):
        x = scale_vectors(base, n, opts["noise"], cfg.seed, dim=q.shape[1])  # (n, d) the stale vectors
    with watch("build"):
        index = make_faiss_index(x, "Flat")
    index_bytes = index.ntotal * getattr(faiss.downcast_index(index), "code_size", 4 * index.d)
    with watch("search"):
        found = np.empty(0, np.int64)
        for s in range(0, len(q), 4096):
            ids = index.search(q[s:s + 4096], min(top_n, n))[1]
            found = np.union1d(found, ids[ids >= 0])
    fresh = scale_vectors(None, len(found), 1.0, cfg.seed + 3, dim=x.shape[1])  # stand-ins for their new vectors
    with watch("overwrite_rows"):
        x[found] = fresh
    del index, fresh
    with watch("rebuild"):
        index = make_faiss_index(x, "Flat")
    mem = memory()
    del index
    s = watch.seconds
    full_embed = n / passages_per_s
    retrieved_embed = len(found) / passages_per_s
    question_embed = opts["questions"] / questions_per_s
    full_total = full_embed + s["rebuild"]
    retrieved_total = question_embed + s["search"] + retrieved_embed + s["overwrite_rows"] + s["rebuild"]
    return {"mode": "scale", "n": n, "dim": int(x.shape[1]), "retriever": retriever_name, "top_n": top_n,
            "sample": len(texts), "sample_source": f"{paths.passages}: passages drawn at random, 5% of words swapped",
            "sample_mean_chars": round(float(np.mean([len(t) for t in texts])), 1),
            "corpus_mean_chars": round(float(np.mean([len(t) for t in corpus])), 1),
            "embed_passages_per_s": round(passages_per_s, 2), "sample_embed_s": round(s["sample_embed"], 3),
            "questions": len(q), "questions_embedded": len(questions), "question_embed_s": round(s["question_embed"], 3),
            "questions_per_s": round(questions_per_s, 2),
            "vectors": f"{emb_path} tiled, noise {opts['noise']}" if base is not None else "synthetic (no embeddings.npy)",
            "make_vectors_s": round(s["make_vectors"], 2), "flat_build_s": round(s["build"], 3),
            "search_s": round(s["search"], 3), "retrieved_passages": int(len(found)),
            "retrieved_share": round(len(found) / n, 5), "overwrite_rows_s": round(s["overwrite_rows"], 3),
            "rebuild_s": round(s["rebuild"], 3), "embeddings_bytes": int(x.nbytes), "index_bytes": int(index_bytes),
            **mem,
            "full_embed_s_extrapolated": round(full_embed, 1), "full_refresh_s_extrapolated": round(full_total, 1),
            "retrieved_embed_s_extrapolated": round(retrieved_embed, 1),
            "retrieved_question_embed_s": round(question_embed, 1),  # measured unless questions_embedded < questions
            "retrieved_refresh_s_extrapolated": round(retrieved_total, 1),
            "speedup_extrapolated": round(full_total / retrieved_total, 2)}


def bench_refresh(parsed) -> dict[str, Any]:
    """Refresh strategies on the run (default), or their costs at `--n` passages (see the module docstring)."""
    import faiss

    opts, cfg = parsed.options, parsed.config()
    device = distributed.setup(cfg.device)
    top_n = opts["top_n"] or cfg.refresh_top_n
    if opts["rerank_n"] < 1:
        raise CozyError("bench refresh: --rerank_n must be at least 1")
    final = cfg.paths.final_retriever
    if not opts["n"] and not final.is_dir():
        raise CozyError(f"bench refresh: {final} not found; train the run first (python -m cozyrag_lib train "
                        f"--run_name={cfg.run_name}), or give --n=N for the costs at N passages")
    spec = str(final) if final.is_dir() else cfg.retriever
    retriever = load_retriever(spec, device=str(device), trust_remote_code=cfg.trust_remote_code)
    result = at_scale(cfg, opts, device, retriever, spec, top_n) if opts["n"] else on_run(cfg, opts, device,
                                                                                          retriever, top_n)
    return {"benchmark": "refresh", **result, "precision": "bf16" if use_bf16(cfg.precision, device) else "fp32",
            "batch_size": cfg.embed_batch_size, "faiss_threads": faiss.omp_get_max_threads(),
            "device": device_name(device)}
