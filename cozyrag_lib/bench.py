"""Benchmarks: `python -m cozyrag_lib bench NAME [--preset=NAME] [--key=value ...]`, one JSON line each.

    python -m cozyrag_lib bench index --preset=demo --max_passages=2000
    python -m cozyrag_lib bench train --preset=demo --steps=20
    python -m cozyrag_lib bench ask --preset=demo --questions=50
    python -m cozyrag_lib bench scale --preset=demo --n=1000000

`index`: passages/s of `embed_texts` against the raw `SentenceTransformer.encode` on the same texts
(block by block, alternating which goes first, so load drift favours neither), and the FAISS build
time (and recall@10 against exact search) of Flat, HNSW32 and IVF indexes over those embeddings.
Options besides config overrides: `--max_passages=N` (a seeded sample; 0 = all).

`train`: samples/s, tokens/s and MFU of the generator phase as `train.py` runs it (contexts built in
batches once per phase, batches padded to their longest, LM-head logits at answer positions only),
retrieval and context building included, against the per-sample step it replaced (`PerSampleStep`)
on the same questions, the two alternating step by step. The default generator is a randomly
initialised GPT-2 of distilgpt2's shape with SmolLM2's tokenizer; `--generator=SPEC` takes any spec.
MFU = model FLOPs (`training_flops`, real tokens only) / seconds / the matmul peak measured in the
same run in the training's dtype (`matmul_peak`). The run's QA, passages and index are used; a run
without them is replaced by a small one (500 articles) built once under the temporary folder.
The original's settings apply unless given (`ORIGINAL_SETTINGS`: top_k 4, 10 sentences, 128-token
context, batch 4, lr 5e-5). Options: `--steps=20`, `--warmup=1`, `--style=both|ours`,
`--generator=SPEC`, `--fused_adamw=0` (ours with the per-tensor AdamW instead of training's fused one).

`ask`: p50 / p95 latency of one-question `RAG.answer` calls on the run's questions, with the mean
retrieve / context / generate split. Options: `--questions=50`, `--warmup=2`; `--precision=fp32` keeps the
generator in fp32 where the run's precision would answer with bf16 weights (see `RAG.load`).

`scale`: an IVF-PQ index (default `IVF{~sqrt(n)},PQ48,Refine(Flat)`) over `--n` vectors (the run's
passage embeddings tiled with Gaussian noise): build time, index bytes, RSS, recall@10 against exact
search and ms per single query at each nprobe, with and without re-ranking. Options: `--n=1000000`,
`--queries=200`, `--factory=`, `--train=65536` (training points), `--nprobes=4,8,16,32,64`,
`--k_factors=2,4,8`, `--noise=1.0`, `--k=10`.

Every benchmark takes `--threads=N` (torch and FAISS threads; 0 = their default) and reports the
1-minute load average: on a machine other jobs share, waiting threads slow every parallel operation.
A new benchmark is a function `(args) -> dict` added to `BENCHMARKS`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from .errors import CozyError


def pop_options(args: list[str], defaults: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Take the benchmark's own `--name=value` options out of `args` (typed like their defaults); the rest
    are config overrides.

    >>> pop_options(["--steps=3", "--style=ours", "--top_k=3"], {"steps": 20, "style": "both"})
    ({'steps': 3, 'style': 'ours'}, ['--top_k=3'])
    """
    opts, rest = dict(defaults), []
    for a in args:
        key, _, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key not in defaults:
            rest.append(a)
            continue
        kind = type(defaults[key])
        if kind is str:
            opts[key] = value
            continue
        try:
            opts[key] = kind(value)
        except ValueError:
            name = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise CozyError(f"bench: --{key}={value!r} is not {name}") from None
        if opts[key] < 0:
            raise CozyError(f"bench: --{key} must not be negative, got {opts[key]}")
    return opts, rest


def pop_int_options(args: list[str], defaults: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """`pop_options` for integer options.

    >>> pop_int_options(["--max_passages=10", "--top_k=3"], {"max_passages": 0})
    ({'max_passages': 10}, ['--top_k=3'])
    """
    return pop_options(args, defaults)


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
    from .models import autocast, load_retriever, use_bf16

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
    if use_bf16(cfg.precision, device):  # what the index stage runs where bf16 is fast (precision auto or bf16)
        def embed_bf16(t: list[str]) -> np.ndarray:
            with autocast("bf16", device):
                return embed_texts(retriever, t, bs, show_progress=False)
        runs["embed_bf16"] = embed_bf16
    # warm-up: the first batches pay for thread pools, allocator and kernel selection
    for run in runs.values():
        run(texts[:bs])
    # Both take the same blocks of 8 batches, alternating which goes first: a machine whose load
    # drifts (other jobs, clocks) over minutes then slows both alike.
    block = 8 * bs
    seconds, parts = {name: 0.0 for name in runs}, []
    parts_bf16 = []
    for b, start in enumerate(tqdm(range(0, len(texts), block), desc="bench", unit="block")):
        for name in (list(runs) if b % 2 == 0 else list(runs)[::-1]):
            sync()
            t0 = time.perf_counter()
            out = runs[name](texts[start:start + block])
            sync()
            seconds[name] += time.perf_counter() - t0
            if name == "embed":
                parts.append(out)
            elif name == "embed_bf16":
                parts_bf16.append(out)
    embeddings = np.concatenate(parts)  # (N, d)
    raw_ps, embed_ps = len(texts) / seconds["raw"], len(texts) / seconds["embed"]
    bf16 = {}
    if parts_bf16:  # speed, and how far bf16 moves each vector (cosine to its fp32 twin)
        cos = np.sum(np.concatenate(parts_bf16) * embeddings, axis=1)  # (N,)
        bf16 = {"embed_bf16_passages_per_s": round(len(texts) / seconds["embed_bf16"], 2),
                "bf16_ratio": round(seconds["embed"] / seconds["embed_bf16"], 4),
                "bf16_cosine_min": round(float(cos.min()), 5), "bf16_cosine_mean": round(float(cos.mean()), 5)}

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
        **bf16,
        "index_build_s": build_s,
        "recall_at_10_vs_flat": recall,
        "faiss_threads": faiss.omp_get_max_threads(),
        "device": device_name(device),
    }


# ----------------------------------------------------------------------------------------------
# shared: stopwatch, the machine's matmul peak, a run with stages 1-3


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


def matmul_peak(device, dtype, n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` (n, n) @ (n, n) matmuls in `dtype`: the machine's practical peak.

    n defaults to 2048 on CPU (large enough for full speed, a tenth of a second each) and 8192 on GPU.
    """
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    watch = Stopwatch(device)
    torch.matmul(a, b)  # warm-up: thread pool, kernel choice
    best = math.inf
    for _ in range(repeats):
        watch.sync()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        watch.sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def has_stages(cfg) -> bool:
    rd = cfg.run_dir
    return all(p.is_file() for p in (rd / "qa" / "train.jsonl", rd / "passages.jsonl", rd / "index" / "manifest.json"))


def run_with_stages(cfg, fallback_articles: int = 0):
    """`cfg` for a run that has stages 1-3 (QA, passages, index), building what is missing.

    With `fallback_articles`, a run without them is left alone: a small run over that many articles of
    the embedded corpus is built once under the temporary folder (`cozyrag-bench/`) and used instead.
    """
    from .chunking import chunk_corpus
    from .index import build_index
    from .qa import prepare_qa

    if has_stages(cfg):
        return cfg
    if fallback_articles:
        articles = cfg.max_articles or fallback_articles
        cfg = dataclasses.replace(cfg, out_root=str(Path(tempfile.gettempdir()) / "cozyrag-bench"),
                                  run_name=f"{cfg.run_name}-{articles}-articles", max_articles=articles)
        if has_stages(cfg):
            return cfg
    print(f"bench: building stages 1-3 in {cfg.run_dir}", file=sys.stderr, flush=True)
    rd = cfg.run_dir
    if not (rd / "qa" / "train.jsonl").is_file():
        prepare_qa(cfg)
    if not (rd / "passages.jsonl").is_file():
        chunk_corpus(cfg)
    if not (rd / "index" / "manifest.json").is_file():
        build_index(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------
# train: our generator phase against the per-sample loop it replaced, on the same questions

DISTILGPT2 = "bench:distilgpt2"  # distilgpt2's shape (6 layers, 768 wide, 12 heads, 50,257 tokens), random weights
# the training settings of the project CoZyRAG grew from; a command-line value wins
ORIGINAL_SETTINGS = {"top_k": 4, "train_max_sentences": 10, "context_tokens": 128, "max_length": 256, "batch_size": 4,
                     "grad_accum": 1, "lr_generator": 5e-5}


def bench_generator(spec: str, cfg):
    """(model, tokenizer) for `spec` as training loads it; DISTILGPT2 is built at random with SmolLM2's tokenizer."""
    from .models import TINY_GENERATOR, load_generator, resolve_generator_path

    if spec != DISTILGPT2:
        return load_generator(spec, cfg.model_cache, cfg.trust_remote_code)
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(resolve_generator_path(TINY_GENERATOR, cfg.model_cache))  # SmolLM2's
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(cfg.seed)
    # activation: GPT-2's tanh GELU as torch's one fused kernel ("gelu_new" is the same function in eight
    # elementwise ops forward and more backward, ~10% of a CPU step); dropout stays at GPT-2's 0.1
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=6, n_head=12,
                        activation_function="gelu_pytorch_tanh",
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config._attn_implementation = "sdpa"  # fused attention (flash / memory-efficient kernels on GPUs)
    return GPT2LMHeadModel(config), tok


def flop_shape(lm) -> dict[str, int]:
    """What the FLOP count needs: layers, width, vocabulary, and the parameters outside embeddings and LM head."""
    from torch import nn

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


def clip_and_step(params: list, opt, grad_clip: float) -> None:
    """The end of a training step as `train_loop` does it: clip the global norm, step, drop the gradients."""
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def ours_step(run, rows: list[int], watch: Stopwatch) -> dict:
    """One optimizer step of the generator phase as `train_loop` runs it: the phase's cached contexts,
    padding to the longest in the batch, LM-head logits at answer positions only, differentiable penalties."""
    from .train import generator_loss, get_batch

    with watch("batch"):
        batch = get_batch(run, "generator", rows)  # tokenise prompts + answers, pad, copy to the device
    with watch("forward_backward"):
        loss, _ = generator_loss(run, batch)
        loss.backward()
    with watch("optimizer"):
        clip_and_step(list(run.generator.parameters()), run.opt_generator, run.cfg.grad_clip)
    head = int(batch["answer_mask"].sum())
    return {"lengths": batch["attention_mask"].sum(1).tolist(), "width": batch["attention_mask"].shape[1],
            "head": head, "head_processed": head, "loss": float(loss.detach())}


class PerSampleStep:
    """The per-sample training step CoZyRAG's loop replaced, kept runnable to compare against (bench only).

    For each item, every epoch: encode the question alone, search FAISS for it alone, split its passages
    into sentences, encode those sentences, keep the `train_max_sentences` most similar ones. Every
    sample is padded to `max_length`; `model(input_ids, labels=...)` computes logits at every position;
    the three penalties come from argmax tokens, so they add to the loss but have no gradient.
    Prompts, answers and token budgets are the same as ours, so both steps learn from the same tokens.
    """

    def __init__(self, cfg, lm, tokenizer, retriever, pindex, autocast):
        self.cfg, self.lm, self.tok, self.retriever, self.pindex, self.autocast = cfg, lm, tokenizer, retriever, pindex, autocast
        self.device = next(lm.parameters()).device
        self.opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr_generator, weight_decay=cfg.weight_decay)

    def context(self, question: str) -> str:
        from .retrieval import truncate_tokens
        from .text import split_sentences

        cfg, passages = self.cfg, self.pindex.passages
        q = self.retriever.encode([question], normalize_embeddings=True, show_progress_bar=False)  # (1, d)
        _, ids = self.pindex.search(q, cfg.top_k)  # (1, k): one search for one question
        sentences = [s for j in ids[0] if j >= 0 for s in split_sentences(passages[j]["text"]) or [passages[j]["text"]]]
        if not sentences:
            return ""
        emb = self.retriever.encode(sentences, normalize_embeddings=True, show_progress_bar=False)  # (S, d)
        best = np.argsort(-(emb @ q[0]), kind="stable")[:cfg.train_max_sentences]
        return truncate_tokens(self.tok, " ".join(sentences[i] for i in best), cfg.context_tokens)

    def batch(self, items: list[dict], contexts: list[str]) -> dict:
        """(B, max_length) input_ids, attention_mask, labels (-100 except on answer + EOS), and answer spans."""
        from .retrieval import encode_example

        cfg, tok = self.cfg, self.tok
        B, T = len(items), cfg.max_length
        input_ids = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        spans = []
        for b, (it, c) in enumerate(zip(items, contexts)):
            e = encode_example(tok, it["question"], c, it["answers"][0], cfg.prompt_template, cfg.max_length)
            seq, start = e["prompt_ids"] + e["answer_ids"], len(e["prompt_ids"])
            input_ids[b, :len(seq)] = torch.tensor(seq)
            attention_mask[b, :len(seq)] = 1
            labels[b, start:len(seq)] = torch.tensor(e["answer_ids"])
            spans.append((start, len(seq)))
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
                "labels": labels.to(self.device), "spans": spans}

    @torch.no_grad()
    def argmax_penalties(self, logits: torch.Tensor, batch: dict) -> float:
        """n-gram repeats, prompt-token overlap and short answers of the argmax answer: a constant per batch."""
        cfg, n = self.cfg, self.cfg.ngram_repeat_n
        preds = logits.argmax(-1).cpu()  # (B, T) the token each position predicts
        ids = batch["input_ids"].cpu()
        total = 0.0
        for b, (start, end) in enumerate(batch["spans"]):
            pred = preds[b, start - 1:end - 1].tolist()  # the predicted answer tokens
            prompt = set(ids[b, :start].tolist())
            grams = [tuple(pred[i:i + n]) for i in range(len(pred) - n + 1)]
            repeat = (len(grams) - len(set(grams))) / max(1, len(grams))
            overlap = 1.0 - len(set(pred) & prompt) / max(1, len(prompt))
            short = float(len(self.tok.decode(pred, skip_special_tokens=True).split()) < cfg.short_answer_min_words)
            total += (cfg.ngram_repeat_weight * repeat + cfg.keyword_overlap_weight * overlap
                      + cfg.short_answer_weight * short)
        return total / len(batch["spans"])

    def step(self, items: list[dict], watch: Stopwatch) -> dict:
        with watch("retrieval"), self.autocast():  # the retriever under the same precision as ours
            contexts = [self.context(it["question"]) for it in items]
        with watch("batch"):
            batch = self.batch(items, contexts)
        with watch("forward_backward"):
            with self.autocast():
                out = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"])  # logits (B, T, V) at every position
            loss = out.loss + self.argmax_penalties(out.logits, batch)
            loss.backward()
        with watch("optimizer"):
            clip_and_step(list(self.lm.parameters()), self.opt, self.cfg.grad_clip)
        B, T = batch["input_ids"].shape
        return {"lengths": [end for _, end in batch["spans"]], "width": T,
                "head": sum(end - start for start, end in batch["spans"]), "head_processed": B * T, "loss": float(loss.detach())}


def step_rows(items: list[dict], cfg, n: int) -> list[list[int]]:
    """Item rows of the first `n` batches of a generator phase (length-bucketed like training; epochs as needed)."""
    from .train import PhaseBatches

    if len(items) < cfg.batch_size:
        raise CozyError(f"bench train: {len(items)} training QA pairs are fewer than one batch of {cfg.batch_size}")
    lengths = np.array([len(it["question"]) + len(it["answers"][0]) for it in items])
    batches = PhaseBatches(lengths, cfg.batch_size, 1, cfg.seed, 0)
    out, epoch = [], 0
    while len(out) < n:
        batches.set_epoch(epoch)
        out += [batches[i] for i in range(len(batches))]
        epoch += 1
    return out[:n]


def bench_train(args: list[str]) -> dict[str, Any]:
    """Generator-phase samples/s, tokens/s and MFU, counting retrieval and context building; and the same
    for the per-sample step (`PerSampleStep`) on the same questions, steps interleaved."""
    import copy

    from . import distributed
    from .config import parse_cli_overrides
    from .index import PassageIndex
    from .losses import GeneratorLoss, stopword_token_ids
    from .models import load_retriever
    from .retrieval import SentenceCache
    from .train import AnswerLM, Run, adamw, load_train_items, new_state, prepare_phase

    opts, rest = pop_options(args, {"steps": 20, "warmup": 1, "style": "both", "generator": DISTILGPT2,
                                    "fused_adamw": 1})
    if opts["style"] not in ("both", "ours"):
        raise CozyError(f"bench train: --style must be both or ours, got {opts['style']!r}")
    if opts["steps"] < 1:
        raise CozyError("bench train: --steps must be at least 1")
    given = parse_cli_overrides(rest)[1]
    cfg = dataclasses.replace(bench_config(rest), **{k: v for k, v in ORIGINAL_SETTINGS.items() if k not in given})
    if not any(a.startswith("--precision=") for a in rest) and cfg.device != "cpu" and torch.cuda.is_available():
        cfg = dataclasses.replace(cfg, precision="bf16")  # on GPUs bf16 autocast unless asked otherwise
    device = distributed.setup(cfg.device)
    cfg = run_with_stages(cfg, fallback_articles=500)
    rd = cfg.run_dir

    items = load_train_items(cfg)
    rows = step_rows(items, cfg, opts["warmup"] + opts["steps"])
    warm, timed = rows[:opts["warmup"]], rows[opts["warmup"]:]
    pindex = PassageIndex.load(rd / "index", rd / "passages.jsonl", retriever=cfg.retriever)
    retriever = load_retriever(cfg.retriever, str(device), cfg.trust_remote_code)
    lm, tok = bench_generator(opts["generator"], cfg)
    lm.to(device).train()
    other = copy.deepcopy(lm) if opts["style"] == "both" else None  # the same initial weights
    run = Run(cfg=cfg, device=device, generator=lm, tokenizer=tok, retriever=retriever, passage_encoder=retriever,
              gen_model=AnswerLM(lm), ret_model=None,
              opt_generator=adamw(lm, cfg.lr_generator, cfg.weight_decay, device, bool(opts["fused_adamw"])),
              opt_retriever=None, loss_fn=GeneratorLoss.from_config(cfg, keyword_ignore_ids=stopword_token_ids(tok)),
              pindex=pindex, items=items, gold=[], val_items=[], plan=[("generator", len(timed))], state=new_state(0))
    run.sentence_cache = SentenceCache(retriever, cfg.embed_batch_size)
    retriever.eval()  # as in a generator phase
    per_sample = PerSampleStep(cfg, other, tok, retriever, pindex, run.autocast) if other is not None else None
    with run.autocast():
        bf16 = torch.is_autocast_enabled(device.type)

    def phase_rows(batches: list[list[int]]) -> list[int]:
        return sorted({i for r in batches for i in r})

    # warm-up (thread pools, allocator, kernel choice), then empty the caches: the timed steps pay for retrieval
    run.phase_data = prepare_phase(run, "generator", phase_rows(warm))
    for r in warm:
        ours_step(run, r, Stopwatch(device))
        if per_sample:
            per_sample.step([items[i] for i in r], Stopwatch(device))
    run.context_cache, run.phase_data = {}, None
    run.sentence_cache.reset(0)

    peak_dtype = torch.bfloat16 if bf16 else torch.float32
    peak = matmul_peak(device, peak_dtype)
    shape = flop_shape(lm)
    watch, watch_ps = Stopwatch(device), Stopwatch(device)
    ours, theirs = [], []
    with watch("retrieval"):  # the phase's contexts: batched retrieval and sentence ranking, as prepare_phase does
        run.phase_data = prepare_phase(run, "generator", phase_rows(timed))
    for s, r in enumerate(tqdm(timed, desc="bench train", unit="step")):
        # alternate which style goes first, so load drift on a shared machine favours neither
        for style in (("ours", "per_sample") if s % 2 == 0 else ("per_sample", "ours")):
            if style == "ours":
                ours.append(ours_step(run, r, watch))
            elif per_sample:
                theirs.append(per_sample.step([items[i] for i in r], watch_ps))
    peak = max(peak, matmul_peak(device, peak_dtype))  # best of both ends of the run

    def summary(steps: list[dict], w: Stopwatch, prefix: str = "") -> dict:
        n = sum(len(x["lengths"]) for x in steps)
        tokens = sum(sum(x["lengths"]) for x in steps)
        flops = sum(training_flops(shape, x["lengths"], x["head"]) for x in steps)  # useful work
        # what the hardware did: every padded position through the model, and the LM head where it ran
        processed = sum(training_flops(shape, [x["width"]] * len(x["lengths"]), x["head_processed"]) for x in steps)
        compute = w.seconds.get("forward_backward", 0.0) + w.seconds.get("optimizer", 0.0)
        out = {"samples_per_s": n / w.total, "tokens_per_s": tokens / w.total, "mfu": flops / w.total / peak,
               "mfu_model_step": flops / compute / peak, "mfu_processed": processed / w.total / peak,
               "padding_fraction": 1 - tokens / sum(x["width"] * len(x["lengths"]) for x in steps),
               "retrieval_share": w.seconds.get("retrieval", 0.0) / w.total,
               "seconds": {k: round(v, 3) for k, v in w.seconds.items()}, "samples": n, "real_tokens": tokens,
               "loss_last": steps[-1]["loss"]}
        return {prefix + k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}

    result = {"benchmark": "train", "generator": opts["generator"], "params": sum(p.numel() for p in lm.parameters()),
              "source": str(rd), "device": device_name(device), "precision": "bf16" if bf16 else "fp32",
              "steps": len(timed), "batch_size": cfg.batch_size, **summary(ours, watch)}
    if per_sample:
        result.update(summary(theirs, watch_ps, "original_"))
        result["ratio"] = round(result["samples_per_s"] / result["original_samples_per_s"], 4)
    result.update({"peak_flops": round(peak), "peak_dtype": str(peak_dtype).replace("torch.", ""),
                   "flop_count": "3 x (2 x non-embedding params x real tokens + 4 x layers x width x T^2 per sequence "
                                 "+ 2 x width x vocab x answer positions); *_mfu_processed counts every padded "
                                 "position, and the LM head wherever it ran (all positions in the original)",
                   "fused_adamw": bool(opts["fused_adamw"]),
                   "settings": {k: getattr(cfg, k) for k in (*ORIGINAL_SETTINGS, "grad_clip")}})
    return result


# ----------------------------------------------------------------------------------------------
# ask: latency of one-question answer() calls


def bench_questions(cfg, n: int) -> list[str]:
    """`n` distinct questions of the run's QA (validation first, then test, then train)."""
    from .qa import read_qa

    out: dict[str, None] = {}
    for split in ("validation", "test", "train"):
        path = cfg.run_dir / "qa" / f"{split}.jsonl"
        for it in read_qa(path) if path.is_file() else []:
            out.setdefault(it["question"], None)
            if len(out) == n:
                return list(out)
    return list(out)


def bench_ask(args: list[str]) -> dict[str, Any]:
    """p50 / p95 latency of `RAG.answer` on single questions, with the retrieve / context / generate split.

    The run's trained models when `final/` holds them, else its base models (`base:RUN`); stages 1-3
    are built first when the run lacks them.
    """
    from .config import load_config, parse_cli_overrides
    from .rag import RAG, TRAINED

    opts, rest = pop_options(args, {"questions": 50, "warmup": 2})
    if opts["questions"] < 1:
        raise CozyError("bench ask: --questions must be at least 1")
    preset, overrides = parse_cli_overrides(rest)
    cfg = run_with_stages(load_config(preset or "demo", overrides))
    trained = (cfg.run_dir / TRAINED / "generator" / "config.json").is_file()
    spec = ("" if trained else "base:") + str(cfg.run_dir)
    rag = RAG.load(spec, **{k: v for k, v in overrides.items() if k not in ("out_root", "run_name")})
    questions = bench_questions(cfg, opts["warmup"] + opts["questions"])
    if len(questions) <= opts["warmup"]:
        raise CozyError(f"bench ask: {cfg.run_dir / 'qa'} has {len(questions)} questions, need more than "
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


# ----------------------------------------------------------------------------------------------
# scale: an IVF-PQ index over a million vectors: build time, memory, recall against exact search, latency


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


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each exact top-k list that `found` recovered (ids; -1 never matches)."""
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(found, exact)]))


def single_query_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """(ids (Q, k), ms per query) searching one query at a time, as `answer()` does."""
    t0 = time.perf_counter()
    ids = np.stack([index.search(queries[i:i + 1], k)[1][0] for i in range(len(queries))])
    return ids, (time.perf_counter() - t0) / len(queries) * 1000


def bench_scale(args: list[str]) -> dict[str, Any]:
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

    from .index import new_faiss_index, set_search_params

    opts, rest = pop_options(args, {"n": 1_000_000, "queries": 200, "factory": "",
                                    "train": 65536, "nprobes": "4,8,16,32,64", "k_factors": "2,4,8",
                                    "noise": 1.0, "k": 10})
    cfg = bench_config(rest)
    nprobes = [int(v) for v in opts["nprobes"].split(",") if v]
    k_factors = [int(v) for v in opts["k_factors"].split(",") if v]
    emb_path = cfg.run_dir / "index" / "embeddings.npy"
    base = np.load(emb_path) if emb_path.is_file() else None
    n, k = opts["n"], opts["k"]
    if n < 1 or opts["queries"] < 1 or k < 1:
        raise CozyError("bench scale: --n, --queries and --k must be at least 1")
    # about sqrt(n) cells (a power of two): 1,024 for a million vectors
    factory = opts["factory"] or f"IVF{2 ** round(math.log2(math.sqrt(n)))},PQ48,Refine(Flat)"

    t0 = time.perf_counter()
    x = scale_vectors(base, n, opts["noise"], cfg.seed)  # (n, d)
    rng = np.random.default_rng(cfg.seed + 1)
    queries = scale_vectors(x[rng.choice(n, opts["queries"], replace=False)], opts["queries"], opts["noise"],
                            cfg.seed + 2)  # (Q, d): corpus vectors, perturbed again
    make_s = time.perf_counter() - t0
    d = x.shape[1]

    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    t0 = time.perf_counter()
    exact_scores, exact = flat.search(queries, k)  # (Q, k): the truth, in one batched search
    flat_batched_ms = (time.perf_counter() - t0) / len(queries) * 1000
    _, flat_ms = single_query_search(flat, queries[:20], k)
    flat_bytes = flat.ntotal * d * 4
    del flat

    index = new_faiss_index(factory, d)
    t0 = time.perf_counter()
    if not index.is_trained:
        index.train(x[np.sort(rng.choice(n, min(n, opts["train"]), replace=False))])
    train_s = time.perf_counter() - t0
    index.add(x)
    build_s = time.perf_counter() - t0
    index_bytes = faiss.serialize_index(index).nbytes
    refine = faiss.downcast_index(index) if hasattr(faiss.downcast_index(index), "k_factor") else None

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
    good = [r for r in rows if r["recall_at_10"] >= 0.9]
    best = min(good, key=lambda r: r["ms_per_query"]) if good else max(rows, key=lambda r: r["recall_at_10"])
    base_bytes = faiss.serialize_index(refine.base_index).nbytes if refine is not None else index_bytes
    return {"benchmark": "scale", "n": n, "dim": d, "queries": len(queries), "k": k, "factory": factory,
            "vectors": f"{emb_path} tiled, noise {opts['noise']}" if base is not None else "synthetic (no embeddings.npy)",
            "make_vectors_s": round(make_s, 2), "train_points": min(n, opts["train"]), "train_s": round(train_s, 2),
            "build_s": round(build_s, 2), "index_bytes": index_bytes, "ivfpq_bytes": base_bytes,
            "flat_bytes": flat_bytes, "rss_bytes": psutil.Process().memory_info().rss,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "flat_ms_per_query": round(flat_ms, 3), "flat_batched_ms_per_query": round(flat_batched_ms, 3),
            "exact_sim_at_1": round(float(exact_scores[:, 0].mean()), 4),
            "exact_sim_at_k": round(float(exact_scores[:, -1].mean()), 4),
            "best": best, "recall_at_10": best["recall_at_10"], "ms_per_query": best["ms_per_query"],
            "search": rows, "faiss_threads": faiss.omp_get_max_threads()}


# name -> function taking the arguments after the name and returning one JSON-able result
BENCHMARKS: dict[str, Callable[[list[str]], dict[str, Any]]] = {
    "index": bench_index,
    "train": bench_train,
    "ask": bench_ask,
    "scale": bench_scale,
}


def cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise CozyError(f"bench: unknown benchmark '{name}' (known: {', '.join(BENCHMARKS)})")
    opts, rest = pop_options(rest, {"threads": 0})
    import faiss

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    if opts["threads"]:  # e.g. 1 on a machine other jobs share: idle-waiting threads stall every parallel op
        torch.set_num_threads(opts["threads"])
        faiss.omp_set_num_threads(opts["threads"])
    try:
        result = BENCHMARKS[name](rest)
        result.update(threads=torch.get_num_threads(), load_avg_1m=round(os.getloadavg()[0], 2))  # what else ran
    finally:  # in-process callers (tests, notebooks) keep their own settings
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
    print(json.dumps(result), flush=True)
    return 0
