"""Benchmarks: `python -m cozyrag_lib bench NAME [--preset=NAME] [--key=value ...]`, one JSON line each.

    python -m cozyrag_lib bench index --preset=demo --max_passages=2000

`index`: passages/s of `embed_texts` against the raw `SentenceTransformer.encode` on the same texts
(block by block, alternating which goes first, so load drift favours neither), and the FAISS build
time (and recall@10 against exact search) of Flat, HNSW32 and IVF indexes over those embeddings.
Options besides config overrides: `--max_passages=N` (a seeded sample; 0 = all).

A new benchmark is a function `(args) -> dict` added to `BENCHMARKS`.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from .errors import CozyError


def pop_int_options(args: list[str], defaults: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """Take the benchmark's own `--name=int` options out of `args`; the rest are config overrides.

    >>> pop_int_options(["--max_passages=10", "--top_k=3"], {"max_passages": 0})
    ({'max_passages': 10}, ['--top_k=3'])
    """
    opts, rest = dict(defaults), []
    for a in args:
        key, _, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key in defaults:
            try:
                opts[key] = int(value)
            except ValueError:
                raise CozyError(f"bench: --{key}={value!r} is not an integer") from None
            if opts[key] < 0:
                raise CozyError(f"bench: --{key} must not be negative, got {opts[key]}")
        else:
            rest.append(a)
    return opts, rest


def bench_config(args: list[str]):
    from .config import load_config, parse_cli_overrides

    preset, overrides = parse_cli_overrides(args)
    return load_config(preset or "demo", overrides)


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def bench_passages(cfg, max_passages: int = 0) -> tuple[list[dict], str]:
    """Passages to benchmark on and where they came from: the run's passages.jsonl, chunked now if missing.

    Without the chunking module, the corpus articles' lead sections stand in as passages.
    """
    path = cfg.run_dir / "passages.jsonl"
    try:
        from .chunking import chunk_corpus, read_passages
    except ImportError:
        from .models import package_file

        data = json.loads(package_file("embedded:wiki-summaries-en").read_text(encoding="utf-8"))
        titles = sorted(data)[: cfg.max_articles or None]
        passages = [{"id": str(i), "title": t, "text": data[t]["extract"]} for i, t in enumerate(titles)]
        source = "corpus lead sections (no chunking module)"
    else:
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


def bench_index(args: list[str]) -> dict[str, Any]:
    """Embedding throughput (ours vs raw encode) and FAISS build times on the run's passages."""
    import faiss

    from . import distributed
    from .index import embed_texts, make_faiss_index, passage_texts
    from .models import load_retriever

    opts, rest = pop_int_options(args, {"max_passages": 0})
    cfg = bench_config(rest)
    device = distributed.setup(cfg.device)
    passages, source = bench_passages(cfg, opts["max_passages"])
    if not passages:
        raise CozyError(f"bench index: no passages in {source}")
    texts = passage_texts(passages)
    retriever = load_retriever(cfg.retriever, device=str(device), trust_remote_code=cfg.trust_remote_code)
    bs = cfg.embed_batch_size

    def sync():
        if device.type == "cuda":
            import torch

            torch.cuda.synchronize(device)

    runs: dict[str, Callable[[list[str]], np.ndarray]] = {
        "raw": lambda t: retriever.encode(t, batch_size=bs, normalize_embeddings=True, show_progress_bar=False),
        "embed": lambda t: embed_texts(retriever, t, bs, show_progress=False),
    }
    # warm-up: the first batches pay for thread pools, allocator and kernel selection
    for run in runs.values():
        run(texts[:bs])
    # Both take the same blocks of 8 batches, alternating which goes first: a machine whose load
    # drifts (other jobs, clocks) over minutes then slows both alike.
    block = 8 * bs
    seconds, parts = {name: 0.0 for name in runs}, []
    for b, start in enumerate(tqdm(range(0, len(texts), block), desc="bench", unit="block")):
        for name in (("raw", "embed") if b % 2 == 0 else ("embed", "raw")):
            sync()
            t0 = time.perf_counter()
            out = runs[name](texts[start:start + block])
            sync()
            seconds[name] += time.perf_counter() - t0
            if name == "embed":
                parts.append(out)
    embeddings = np.concatenate(parts)  # (N, d)
    raw_ps, embed_ps = len(texts) / seconds["raw"], len(texts) / seconds["embed"]

    # FAISS: build time, and recall@10 of the approximate indexes against exact search
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
        recall[factory] = round(float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ids, exact)])), 4)
    return {
        "benchmark": "index",
        "passages": n,
        "source": source,
        "retriever": cfg.retriever,
        "batch_size": bs,
        "block": block,
        "encode_raw_passages_per_s": round(raw_ps, 2),
        "embed_passages_per_s": round(embed_ps, 2),
        "ratio": round(embed_ps / raw_ps, 4),
        "index_build_s": build_s,
        "recall_at_10_vs_flat": recall,
        "faiss_threads": faiss.omp_get_max_threads(),
        "device": device_name(device),
    }


# name -> function taking the arguments after the name and returning one JSON-able result
BENCHMARKS: dict[str, Callable[[list[str]], dict[str, Any]]] = {
    "index": bench_index,
}


def cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise CozyError(f"bench: unknown benchmark '{name}' (known: {', '.join(BENCHMARKS)})")
    print(json.dumps(BENCHMARKS[name](rest)), flush=True)
    return 0
