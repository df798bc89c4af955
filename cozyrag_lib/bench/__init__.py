"""Benchmarks: `python -m cozyrag_lib bench NAME [--preset=NAME] [--key=value ...]`, one JSON line each.

    python -m cozyrag_lib bench index --preset=demo --max_passages=2000
        passages/s of our embedding against raw encode; FAISS build time and recall@10 per index type
    python -m cozyrag_lib bench train --preset=demo --steps=20
        samples/s, tokens/s and MFU of our generator phase against the per-sample loop it replaced
    python -m cozyrag_lib bench ask --preset=demo --questions=50
        p50 / p95 latency of one-question answer() calls (retrieve / context / generate), beside a reference path
    python -m cozyrag_lib bench scale --preset=demo --n=1000000
        an IVF-PQ index over a million vectors: build time, memory, recall@10, ms per query
    python -m cozyrag_lib bench refresh --preset=demo [--n=1000000]
        the index refresh after a retriever phase: recall, seconds and passages embedded per strategy
        (stale, full, retrieved, rerank) on a trained run; with --n its costs at n passages

Every benchmark takes `--threads=N` (torch and FAISS threads; 0 = their default) and reports the
1-minute load average: on a machine other jobs share, waiting threads slow every parallel operation.
Each lives in its own module (`index.py`, `train.py`, `ask.py`, `scale.py`, `refresh.py`, whose docstrings say what it
measures), what they share in `common.py`. Their options are declared as `bench NAME` in the command
table of `cozyrag_lib/cli.py` (`bench NAME --help` lists them), which checks and types the command line before a
benchmark gets it as a `cli.Parsed` (`.options`, `.config()`). A new benchmark is a function
`(parsed) -> dict` added to `BENCHMARKS` and its entry in that table.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import torch

from ..cli import COMMANDS, Parsed, help_text, parse_command
from ..errors import CozyError
from .ask import bench_ask
from .index import bench_index
from .refresh import bench_refresh
from .scale import bench_scale
from .train import bench_train

# name -> function taking the parsed command line (`cli.Parsed`: .options, .config()) and returning one JSON-able result
BENCHMARKS: dict[str, Callable[[Parsed], dict[str, Any]]] = {
    "index": bench_index,
    "train": bench_train,
    "ask": bench_ask,
    "scale": bench_scale,
    "refresh": bench_refresh,
}


def usage() -> str:
    """This docstring, then each benchmark's module docstring and options."""
    return "\n".join([__doc__ or "", *(f"{sys.modules[f.__module__].__doc__ or ''}\n{help_text(f'bench {name}')}"
                                      for name, f in BENCHMARKS.items())])


def cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS or f"bench {name}" not in COMMANDS:
        raise CozyError(f"bench: unknown benchmark '{name}' (known: {', '.join(BENCHMARKS)})")
    parsed = parse_command(f"bench {name}", rest)
    for key, value in parsed.options.items():  # counts, sizes, noise: none of them may be negative
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise CozyError(f"bench {name}: --{key} must not be negative, got {value}")
    threads = parsed.options["threads"]
    import faiss

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    if threads:  # e.g. 1 on a machine other jobs share: idle-waiting threads stall every parallel op
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    try:
        result = BENCHMARKS[name](parsed)
        result.update(threads=torch.get_num_threads(), load_avg_1m=round(os.getloadavg()[0], 2))  # what else ran
    finally:  # in-process callers (tests, notebooks) keep their own settings
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
    print(json.dumps(result), flush=True)
    return 0
