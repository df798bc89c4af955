"""What the benchmarks share: their option parsing, a stopwatch, the machine's matmul peak, FLOP counts,
recall@k against exact search, and a run with stages 1-3 (QA, passages, index) to measure on."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..chunking import chunk_corpus
from ..index import build_index
from ..qa import prepare_qa

# ----------------------------------------------------------------------------------------------
# options and config


def device_name(device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------
# timing and the machine's peak


class Stopwatch:
    """Seconds per named part, summed over calls; CUDA work is waited for at both ends of a part.

    >>> watch = Stopwatch(torch.device("cpu"))
    >>> with watch("step"):
    ...     pass
    >>> list(watch.seconds)
    ['step']
    """

    def __init__(self, device):
        self.device, self.seconds = device, {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def matmul_peak(device, dtype, n: int | None = None, repeats: int = 5, budget_s: float = 0.25) -> float:
    """FLOP/s of the fastest of `repeats` (n, n) @ (n, n) matmuls in `dtype`: the machine's practical peak.

    n defaults to 8192 on GPU. On CPU it grows from 256 by doubling, up to 2048, while the next size's
    product would still take under `budget_s` (8 times this one's): full size where the dtype has hardware
    (bf16 with AMX), a few hundred where it is emulated (bf16 on an AVX2-only CPU runs ~1 GFLOP/s, where a
    2048 product would take half a minute).
    """
    watch = Stopwatch(device)

    def one(a, b) -> float:
        watch.sync()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        watch.sync()
        return time.perf_counter() - t0

    def operands(size: int):
        return (torch.randn(size, size, device=device).to(dtype), torch.randn(size, size, device=device).to(dtype))

    grow = n is None and device.type != "cuda"
    n = n or (8192 if device.type == "cuda" else 256)
    a, b = operands(n)
    torch.matmul(a, b)  # warm-up: thread pool, kernel choice
    while grow and n < 2048 and 8 * one(a, b) < budget_s:
        n *= 2
        a, b = operands(n)
        torch.matmul(a, b)  # warm-up at the new size
    best = min(one(a, b) for _ in range(repeats))
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------------------------
# training: FLOP counts, the end of a step


def flop_shape(lm) -> dict[str, int]:
    """What the FLOP count needs: layers, width, vocabulary, and the parameters outside embeddings and LM head."""
    head = lm.get_output_embeddings().weight
    tables = {id(p) for m in lm.modules() if isinstance(m, nn.Embedding) for p in m.parameters()} | {id(head)}
    c = lm.config
    return {"layers": c.num_hidden_layers, "width": c.hidden_size, "vocab": head.shape[0],
            "body_params": sum(p.numel() for p in lm.parameters() if id(p) not in tables)}


def training_flops(shape: dict[str, int], lengths: list[int], head_positions: int) -> float:
    """FLOPs of a training step (forward + backward = 3 x forward) over sequences of `lengths` tokens.

    Forward, per sequence of T tokens: 2 x body params x T (each weight matrix once per token), plus
    4 x layers x width x T^2 (attention scores and their weighted sum, the full square), plus
    2 x width x vocab for each position that goes through the LM head.

    >>> training_flops({"layers": 1, "width": 2, "vocab": 3, "body_params": 10}, [4], head_positions=1)
    660
    """
    L, d = shape["layers"], shape["width"]
    forward = sum(2 * shape["body_params"] * T + 4 * L * d * T * T for T in lengths)
    return 3 * (forward + 2 * d * shape["vocab"] * head_positions)


# ----------------------------------------------------------------------------------------------
# search quality


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each exact top-k list (rows of ids) that `found` recovered; -1 (no result) never matches
    a real id.

    >>> recall_at(np.array([[1, 2], [3, -1]]), np.array([[2, 1], [3, 4]]))
    0.75
    """
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(found, exact)]))


# ----------------------------------------------------------------------------------------------
# a run with stages 1-3


def has_stages(cfg) -> bool:
    p = cfg.paths
    return all(f.is_file() for f in (p.qa_split("train"), p.passages, p.index / "manifest.json"))


def run_with_stages(cfg, fallback_articles: int = 0):
    """`cfg` for a run that has stages 1-3 (QA, passages, index), building what is missing.

    With `fallback_articles`, a run without them is left alone: a small run over that many articles of
    the embedded corpus is built once under the temporary folder (`cozyrag-bench/`) and used instead.
    """
    if has_stages(cfg):
        return cfg
    if fallback_articles:
        articles = cfg.max_articles or fallback_articles
        cfg = dataclasses.replace(cfg, out_root=str(Path(tempfile.gettempdir()) / "cozyrag-bench"),
                                  run_name=f"{cfg.run_name}-{articles}-articles", max_articles=articles)
        if has_stages(cfg):
            return cfg
    print(f"bench: building stages 1-3 in {cfg.run_dir}", file=sys.stderr, flush=True)
    p = cfg.paths
    if not p.qa_split("train").is_file():
        prepare_qa(cfg)
    if not p.passages.is_file():
        chunk_corpus(cfg)
    if not (p.index / "manifest.json").is_file():
        build_index(cfg)
    return cfg
