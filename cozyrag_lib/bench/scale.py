"""`bench scale`: an IVF-PQ index (default `IVF{~sqrt(n)},PQ48,Refine(Flat)`) over `--n` vectors (the run's
passage embeddings tiled with Gaussian noise): build time, index bytes, RSS, recall@10 against exact
search and ms per single query at each nprobe, with and without re-ranking.

    python -m cozyrag_lib bench scale --preset=demo --n=1000000

Options: `--n=1000000`, `--queries=200`, `--factory=`, `--train=65536` (training points),
`--nprobes=4,8,16,32,64`, `--k_factors=2,4,8`, `--noise=1.0`, `--k=10`.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from ..errors import CozyError
from ..index import new_faiss_index, set_search_params
from .common import recall_at


def scale_vectors(base: np.ndarray | None, n: int, noise: float, seed: int, dim: int = 384) -> np.ndarray:
    """(n, d) unit vectors: the rows of `base` repeated, each copy plus Gaussian noise of norm ~`noise`.

    With noise 1 a copy keeps cosine ~0.7 to its source and ~0.5 to its siblings: neighbours, not
    duplicates. Without `base`, a synthetic corpus: 1,000 random unit centres stand in for it.
    """
    rng = np.random.default_rng(seed)
    if base is None:
        base = rng.standard_normal((1000, dim), dtype=np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
    d = base.shape[1]
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 65536):  # in blocks: the noise of a million rows at once would double peak memory
        rows = np.arange(s, min(n, s + 65536))
        x[rows] = base[rows % len(base)] + rng.standard_normal((len(rows), d), dtype=np.float32) * (noise / math.sqrt(d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def single_query_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """(ids (Q, k), ms per query) searching one query at a time, as `answer()` does."""
    t0 = time.perf_counter()
    ids = np.stack([index.search(queries[i:i + 1], k)[1][0] for i in range(len(queries))])
    return ids, (time.perf_counter() - t0) / len(queries) * 1000


def exact_search(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(scores (Q, k), ids (Q, k)) of exact (Flat) search, the truth, and what Flat costs: ms per query
    batched and single, bytes."""
    import faiss

    d = x.shape[1]
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    t0 = time.perf_counter()
    scores, ids = flat.search(queries, k)  # in one batched search
    batched_ms = (time.perf_counter() - t0) / len(queries) * 1000
    _, single_ms = single_query_search(flat, queries[:20], k)
    cost = {"flat_bytes": flat.ntotal * d * 4, "flat_ms_per_query": round(single_ms, 3),
            "flat_batched_ms_per_query": round(batched_ms, 3)}
    return scores, ids, cost


def train_and_add(factory: str, x: np.ndarray, train_points: int, rng: np.random.Generator) -> tuple[Any, float, float]:
    """(index, train seconds, train + add seconds): `factory` trained on a seeded sample of `x`, then filled."""
    index = new_faiss_index(factory, x.shape[1])
    t0 = time.perf_counter()
    if not index.is_trained:
        index.train(x[np.sort(rng.choice(len(x), min(len(x), train_points), replace=False))])
    train_s = time.perf_counter() - t0
    index.add(x)
    return index, train_s, time.perf_counter() - t0


def search_rows(index, refine, queries: np.ndarray, exact: np.ndarray, k: int, nprobes: list[int],
                k_factors: list[int]) -> list[dict]:
    """Recall@k and ms per single query at each nprobe: for a `Refine` index (`refine`, else None) the
    IVF-PQ part alone (k_factor 0), then re-ranked at each of `k_factors`."""
    rows = []
    for nprobe in nprobes:
        set_search_params(index, nprobe)
        if refine is not None:  # the IVF-PQ part alone, then re-ranked
            ids, ms = single_query_search(refine.base_index, queries, k)
            rows.append({"nprobe": nprobe, "k_factor": 0, "recall_at_10": round(recall_at(ids, exact), 4), "ms_per_query": round(ms, 3)})
        for kf in (k_factors if refine is not None else [1]):
            if refine is not None:
                refine.k_factor = kf
            ids, ms = single_query_search(index, queries, k)
            rows.append({"nprobe": nprobe, "k_factor": kf if refine is not None else 1,
                         "recall_at_10": round(recall_at(ids, exact), 4), "ms_per_query": round(ms, 3)})
    return rows


def bench_scale(parsed) -> dict[str, Any]:
    """Build `--factory` over `--n` vectors; memory, recall@10 against exact (Flat) search, ms/query per nprobe.

    The vectors are the run's passage embeddings (index/embeddings.npy) tiled with Gaussian noise
    (`--noise`), synthetic ones when the run has none; queries are perturbed corpus vectors. For a
    `...,Refine(...)` factory the IVF-PQ part alone is measured too (`base_`), and re-ranking at each
    `--k_factors` value (candidates = k x factor, re-scored with the stored vectors). The default
    factory is `IVF{~sqrt(n)},PQ48,Refine(Flat)`.
    """
    import resource

    import faiss
    import psutil

    opts, cfg = parsed.options, parsed.config()
    nprobes = [int(v) for v in opts["nprobes"].split(",") if v]
    k_factors = [int(v) for v in opts["k_factors"].split(",") if v]
    emb_path = cfg.paths.index / "embeddings.npy"
    base = np.load(emb_path) if emb_path.is_file() else None
    n, k = opts["n"], opts["k"]
    if n < 1 or opts["queries"] < 1 or k < 1:
        raise CozyError("bench scale: --n, --queries and --k must be at least 1")
    # about sqrt(n) cells (a power of two): 1,024 for a million vectors
    factory = opts["factory"] or f"IVF{2 ** round(math.log2(math.sqrt(n)))},PQ48,Refine(Flat)"

    t0 = time.perf_counter()
    x = scale_vectors(base, n, opts["noise"], cfg.seed)  # (n, d)
    rng = np.random.default_rng(cfg.seed + 1)  # the queries' rows, then the training sample
    queries = scale_vectors(x[rng.choice(n, opts["queries"], replace=False)], opts["queries"], opts["noise"],
                            cfg.seed + 2)  # (Q, d): corpus vectors, perturbed again
    make_s = time.perf_counter() - t0
    exact_scores, exact, flat = exact_search(x, queries, k)
    index, train_s, build_s = train_and_add(factory, x, opts["train"], rng)
    index_bytes = faiss.serialize_index(index).nbytes
    refine = faiss.downcast_index(index) if hasattr(faiss.downcast_index(index), "k_factor") else None

    rows = search_rows(index, refine, queries, exact, k, nprobes, k_factors)
    good = [r for r in rows if r["recall_at_10"] >= 0.9]
    best = min(good, key=lambda r: r["ms_per_query"]) if good else max(rows, key=lambda r: r["recall_at_10"])
    base_bytes = faiss.serialize_index(refine.base_index).nbytes if refine is not None else index_bytes
    return {"benchmark": "scale", "n": n, "dim": x.shape[1], "queries": len(queries), "k": k, "factory": factory,
            "vectors": f"{emb_path} tiled, noise {opts['noise']}" if base is not None else "synthetic (no embeddings.npy)",
            "make_vectors_s": round(make_s, 2), "train_points": min(n, opts["train"]), "train_s": round(train_s, 2),
            "build_s": round(build_s, 2), "index_bytes": index_bytes, "ivfpq_bytes": base_bytes,
            "flat_bytes": flat["flat_bytes"], "rss_bytes": psutil.Process().memory_info().rss,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "flat_ms_per_query": flat["flat_ms_per_query"], "flat_batched_ms_per_query": flat["flat_batched_ms_per_query"],
            "exact_sim_at_1": round(float(exact_scores[:, 0].mean()), 4),
            "exact_sim_at_k": round(float(exact_scores[:, -1].mean()), 4),
            "best": best, "recall_at_10": best["recall_at_10"], "ms_per_query": best["ms_per_query"],
            "search": rows, "faiss_threads": faiss.omp_get_max_threads()}
