"""`bench index`: passages/s of `embed_texts` against the raw `SentenceTransformer.encode` on the same texts
(block by block, alternating which goes first, so load drift favours neither), and the FAISS build
time (and recall@10 against exact search) of Flat, HNSW32 and IVF indexes over those embeddings.

    python -m cozyrag_lib bench index --preset=demo --max_passages=2000

Options besides config overrides: `--max_passages=N` (a seeded sample; 0 = all).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from .. import distributed
from ..chunking import chunk_corpus, read_passages
from ..errors import CozyError
from ..embedding import embed_texts, passage_texts
from ..index import make_faiss_index
from ..models import autocast, load_retriever, use_bf16
from .common import Stopwatch, device_name, recall_at

Embed = Callable[[list[str]], np.ndarray]


def bench_passages(cfg, max_passages: int = 0) -> tuple[list[dict], str]:
    """Passages to benchmark on and where they came from: the run's passages.jsonl, chunked now if missing."""
    path = cfg.paths.passages
    source = str(path)
    if not (path.is_file() and path.stat().st_size):
        chunk_corpus(cfg)
        source += " (chunked now)"
    passages = read_passages(path)
    if max_passages and len(passages) > max_passages:
        # a seeded sample rather than the first N: the corpus is sorted by title, lengths vary by topic
        rows = np.sort(np.random.default_rng(cfg.seed).choice(len(passages), max_passages, replace=False))
        passages = [passages[i] for i in rows]
    return passages, source


def embed_runs(retriever, batch_size: int, bf16: bool, device) -> dict[str, Embed]:
    """The ways to embed a list of texts that are timed: raw encode, `embed_texts`, and with `bf16`
    `embed_texts` under bf16 autocast (what the index stage runs where bf16 is fast)."""
    runs: dict[str, Embed] = {
        "raw": lambda t: retriever.encode(t, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False),
        "embed": lambda t: embed_texts(retriever, t, batch_size, show_progress=False),
    }
    if bf16:
        def embed_bf16(t: list[str]) -> np.ndarray:
            with autocast("bf16", device):
                return embed_texts(retriever, t, batch_size, show_progress=False)
        runs["embed_bf16"] = embed_bf16
    return runs


def time_blocks(runs: dict[str, Embed], texts: list[str], block: int, watch: Stopwatch) -> dict[str, list[np.ndarray]]:
    """Every run over `texts` in blocks of `block`, timed in `watch`; the outputs of all but `raw`, block by block.

    All runs take the same blocks, alternating which goes first: a machine whose load drifts (other jobs,
    clocks) over minutes then slows them alike.
    """
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in runs if name != "raw"}
    for b, start in enumerate(tqdm(range(0, len(texts), block), desc="bench", unit="block")):
        for name in (list(runs) if b % 2 == 0 else list(runs)[::-1]):
            with watch(name):
                out = runs[name](texts[start:start + block])
            if name in outputs:
                outputs[name].append(out)
    return outputs


def faiss_builds(embeddings: np.ndarray, cfg) -> tuple[dict[str, float], dict[str, float]]:
    """Build seconds per index factory, and recall@10 of each against exact search (Flat, built first)."""
    n, d = embeddings.shape
    nlist = max(1, int(math.sqrt(n)))
    factories = ["Flat", "HNSW32", f"IVF{nlist},Flat"]
    if n >= 256 and d % 8 == 0:
        factories.append(f"IVF{nlist},PQ{d // 8}")
    if cfg.index_factory not in factories:
        factories.append(cfg.index_factory)
    queries = embeddings[np.random.default_rng(cfg.seed).choice(n, min(n, 200), replace=False)]  # (Q, d)
    build_s, recall, exact = {}, {}, None
    for factory in factories:
        t0 = time.perf_counter()
        index = make_faiss_index(embeddings, factory, cfg.nprobe, cfg.ef_search)
        build_s[factory] = round(time.perf_counter() - t0, 4)
        _, ids = index.search(queries, min(10, n))  # (Q, 10)
        exact = ids if exact is None else exact  # Flat comes first: exact inner product
        recall[factory] = round(recall_at(ids, exact), 4)
    return build_s, recall


def bench_index(parsed) -> dict[str, Any]:
    """Embedding throughput (ours vs raw encode) and FAISS build times on the run's passages."""
    import faiss

    opts, cfg = parsed.options, parsed.config()
    device = distributed.setup(cfg.device)
    passages, source = bench_passages(cfg, opts["max_passages"])
    if not passages:
        raise CozyError(f"bench index: no passages in {source}")
    texts = passage_texts(passages)
    retriever = load_retriever(cfg.retriever, device=str(device), trust_remote_code=cfg.trust_remote_code)
    bs = cfg.embed_batch_size
    runs = embed_runs(retriever, bs, use_bf16(cfg.precision, device), device)  # bf16: precision auto or bf16
    for run in runs.values():  # warm-up: the first batches pay for thread pools, allocator and kernel selection
        run(texts[:bs])
    block = 8 * bs
    watch = Stopwatch(device)
    outputs = time_blocks(runs, texts, block, watch)
    seconds = watch.seconds
    embeddings = np.concatenate(outputs["embed"])  # (N, d)
    raw_ps, embed_ps = len(texts) / seconds["raw"], len(texts) / seconds["embed"]
    bf16 = {}
    if outputs.get("embed_bf16"):  # speed, and how far bf16 moves each vector (cosine to its fp32 twin)
        cos = np.sum(np.concatenate(outputs["embed_bf16"]) * embeddings, axis=1)  # (N,)
        bf16 = {"embed_bf16_passages_per_s": round(len(texts) / seconds["embed_bf16"], 2),
                "bf16_ratio": round(seconds["embed"] / seconds["embed_bf16"], 4),
                "bf16_cosine_min": round(float(cos.min()), 5), "bf16_cosine_mean": round(float(cos.mean()), 5)}
    build_s, recall = faiss_builds(embeddings, cfg)
    return {
        "benchmark": "index",
        "passages": len(embeddings),
        "source": source,
        "retriever": cfg.retriever,
        "batch_size": bs,
        "block": block,
        "encode_raw_passages_per_s": round(raw_ps, 2),
        "embed_passages_per_s": round(embed_ps, 2),
        "ratio": round(embed_ps / raw_ps, 4),
        **bf16,
        "index_build_s": build_s,
        "recall_at_10_vs_flat": recall,
        "faiss_threads": faiss.omp_get_max_threads(),
        "device": device_name(device),
    }
