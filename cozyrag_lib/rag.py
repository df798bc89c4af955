"""A loaded RAG pipeline: models, passages and index read once, then any number of questions.

    >>> rag = RAG.load("outputs/runs/demo")              # the trained run (final/ of training)
    >>> base = RAG.load("base:outputs/runs/demo")        # the untrained base models with the stage-3 index
    >>> out = rag.answer("Who was Albert Einstein?")
    >>> out["answer"], out["passages"][0]["title"], out["timings"]["total_s"]

or, with the pipeline cached per process, `cozyrag_lib.answer("Who was Albert Einstein?", run="demo")`.
On the command line: `python -m cozyrag_lib ask --run outputs/runs/demo "Who was Albert Einstein?"`.

RUN names a run folder (`outputs/runs/demo`) or a run name (`demo`, looked up under `out_root`);
`base:RUN` uses the models named in that run's config instead of the trained ones.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from .bm25 import Bm25Index
from .chunking import read_passages
from .cli import locate_run, parse_command, run_spec
from .config import Config, load_config
from .distributed import resolve_device
from .errors import CozyError
from .generate import generate_answers
from .embedding import embed_texts, passage_texts
from .index import MANIFEST_FILE, PassageIndex, make_faiss_index, read_manifest
from .jsonio import read_json
from .models import autocast, holds_generator, load_generator, load_retriever, use_bf16, use_int8
from .paths import RunPaths
from .quantize import quantize_int8
from .retrieval import CHAT, SentenceCache, fit_context, format_prompt, rank_sentences, retrieve

MODES = ("rag", "closed", "oracle")


def resolve_run(run: str | Path, out_root: str = "outputs/runs") -> tuple[Path, bool]:
    """(run folder, base?) for a RUN spec: a folder, a run name under out_root, either prefixed by `base:`."""
    spec = str(run)
    base = spec.startswith("base:")
    spec = spec[len("base:"):] if base else spec
    path = Path(spec)
    if not path.is_dir() and (Path(out_root) / spec).is_dir():
        path = Path(out_root) / spec
    if not path.is_dir():
        looked = dict.fromkeys([spec, str(Path(out_root) / spec)])  # one place when spec is an absolute path
        raise CozyError(f"run '{spec}': no such run folder (looked at {' and '.join(looked)})")
    RunPaths(path).upgrade()  # a run of the earlier flat layout: moved into train/, passages/
    return path, base


def run_config(run_dir: Path, **overrides: Any) -> Config:
    """The resolved config a run was made with (training's, else the index stage's), plus overrides."""
    for path in RunPaths(run_dir).stage_configs():
        if path.is_file():
            values = read_json(path, "not a valid config file; rerun that stage")
            if not isinstance(values, dict):
                raise CozyError(f"{path}: not a valid config file (expected a JSON object)")
            values.update(out_root=str(run_dir.parent), run_name=run_dir.name)
            try:
                return load_config(None, {**values, **overrides})
            except CozyError as e:  # an edited file, or one from another version: say which file
                raise CozyError(f"{path}: {str(e).removeprefix('override: ')}") from None
    raise CozyError(f"{run_dir}: no config.json from any stage; is this a CoZyRAG run folder?")


@dataclass
class RAG:
    """Generator + tokenizer + retriever + passage index, with the answering settings of `cfg`."""
    cfg: Config
    generator: Any
    tokenizer: Any
    retriever: Any
    pindex: Any
    name: str = ""
    sentences: Any = field(default=None, repr=False)  # SentenceCache: passage sentence embeddings, kept across calls
    passage_encoder: Any = field(default=None, repr=False)  # embedded the passages: the retriever, unless query_only
    one_sentence: bool = False  # answers end at their first sentence (base: models, which answer in paragraphs)

    @classmethod
    def load(cls, run: str | Path, corpus: str | Path | None = None, device: str | None = None,
             **overrides: Any) -> "RAG":
        """Load a run's trained models (or `base:RUN`'s untrained ones) and its index.

        corpus: a passages JSONL to search instead of the run's own; it is embedded with the run's
        retriever into a temporary in-memory Flat index.
        """
        run_dir, base = resolve_run(run, overrides.get("out_root", "outputs/runs"))
        cfg = run_config(run_dir, **overrides)
        dev = resolve_device(device or cfg.device)
        paths = RunPaths(run_dir)
        if base:
            gen_spec, ret_spec, index_dir = cfg.generator, cfg.retriever, paths.index
        else:
            if not holds_generator(paths.final_generator):
                raise CozyError(f"{run_dir}: no trained model in {paths.final}/ (train it first, or use base:{run_dir} "
                                f"for the untrained models)")
            gen_spec, ret_spec, index_dir = str(paths.final_generator), str(paths.final_retriever), paths.final_index
        # a LoRA run's final/generator is an adapter: it loads on top of the base the run config names; base: loads
        # that config's generator itself (an adapter folder there brings its own base)
        generator, tokenizer = load_generator(gen_spec, cfg.model_cache, cfg.trust_remote_code,
                                              base=None if base else cfg.generator)
        generator.to(dev).eval()
        # on a CPU fast at bf16, int8 weights (answer_quantization auto / int8): decoding is memory-bound
        # there, and answers come in about half the time of bf16 weights with the same EM/F1 (README, Speed).
        # Elsewhere bf16 weights where the hardware is fast at bf16 (precision "auto") or when asked ("bf16").
        if use_int8(cfg.answer_quantization, torch.device(dev)):
            generator = quantize_int8(generator)
        elif use_bf16(cfg.precision, torch.device(dev)):
            generator.to(torch.bfloat16)
        retriever = load_retriever(ret_spec, device=dev, trust_remote_code=cfg.trust_remote_code)
        retriever.eval()
        passage_encoder = load_passage_encoder(index_dir, retriever, dev, cfg)
        if corpus is not None:
            pindex = temporary_index(passage_encoder, corpus, cfg)
        else:
            # the trained run's refreshed final/index and the base index share the stage-3 BM25 (same passages)
            pindex = PassageIndex.load(index_dir, paths.passages, retriever=ret_spec).configure(cfg, paths.bm25)
        name = f"{'base' if base else 'trained'}:{run_dir.name}"
        # context sentences of the index's passages come from its stored vectors (made by passage_encoder)
        stored = pindex.sentence_store() if cfg.sentence_vectors else None
        return cls(cfg, generator, tokenizer, retriever, pindex, name,
                   SentenceCache(passage_encoder, cfg.embed_batch_size, stored=stored), passage_encoder,
                   one_sentence=base)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def with_retrieval(self, mode: str) -> "RAG":
        """This pipeline retrieving by `mode` ("dense", "bm25" or "hybrid"): models, index and caches shared.

        >>> bm25 = rag.with_retrieval("bm25")   # doctest: +SKIP
        """
        return replace(self, cfg=replace(self.cfg, retrieval=mode), pindex=self.pindex.with_retrieval(mode),
                       name=f"{self.name}+{mode}")

    # ------------------------------------------------------------------------------------------
    def answer(self, question: str, top_k: int | None = None, mode: str = "rag", context: str | None = None) -> dict:
        """One question; see `answer_batch` for the result's keys."""
        return self.answer_batch([question], top_k, mode, None if context is None else [context])[0]

    @torch.inference_mode()
    def answer_batch(self, questions: Sequence[str], top_k: int | None = None, mode: str = "rag",
                     contexts: Sequence[str] | None = None) -> list[dict]:
        """Answer questions together (one retrieval search and batched generation).

        mode: "rag" retrieves top_k passages; "closed" gives no context; "oracle" builds the context
        from `contexts` (the gold passages) with the same sentence ranking and token budget.
        Returns one dict per question: question, answer, passages [{id, title, text, score}],
        context_sentences (the sentences given to the generator, best first), context (the text as
        prompted), timings {retrieve_s, context_s, generate_s, total_s} (per question: batch time / n).
        """
        if mode not in MODES:
            raise CozyError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not questions or any(not isinstance(q, str) or not q.strip() for q in questions):
            raise CozyError("questions must be non-empty text")
        cfg, n = self.cfg, len(questions)
        k = cfg.top_k if top_k is None else top_k  # 0 is an error, not "the default"
        if k <= 0:
            raise CozyError(f"top_k must be positive, got {k}")
        t0 = time.perf_counter()
        with autocast(cfg.precision, self.device):  # retrieval and sentence ranking as in training
            hits: list[list[dict]] = [[] for _ in questions]
            if mode == "rag":
                q_emb, scores, ids = retrieve(self.retriever, self.pindex, list(questions), k, cfg.embed_batch_size)
                hits = [[{**self.pindex.passages[j], "score": float(s)} for s, j in zip(srow, irow) if j >= 0]
                        for srow, irow in zip(scores, ids)]
            elif mode == "oracle":
                if contexts is None or len(contexts) != n:
                    raise CozyError("oracle mode needs one gold context per question")

                q_emb = embed_texts(self.retriever, list(questions), cfg.embed_batch_size, show_progress=False)
                hits = [[{"id": f"gold-{i}", "title": "", "text": c, "score": float("nan")}] for i, c in enumerate(contexts)]
            t1 = time.perf_counter()
            sentence_lists: list[list[str]] = [[] for _ in questions]
            prompted = [""] * n
            if mode != "closed":
                # gold contexts are per call: their sentences go to a cache of this call alone
                cache = self.sentences if mode == "rag" else SentenceCache(self.sentences.retriever,
                                                                           self.sentences.batch_size)
                cache.add([p for row in hits for p in row])
                for i, row in enumerate(hits):
                    pids = [p["id"] for p in row]
                    ranked = rank_sentences(q_emb[i], pids, cache, cfg.answer_max_sentences)
                    prompted[i] = fit_context(self.tokenizer, ranked, cfg.context_tokens,
                                              cache.reading_order(pids) if cfg.context_order == "passage" else None)
                    sentence_lists[i] = (sorted((s for s in ranked if s in prompted[i]), key=prompted[i].find)
                                         or ([prompted[i]] if prompted[i] else []))  # in the prompt's order
        t2 = time.perf_counter()
        prompts = [format_prompt(self.tokenizer, q, c, cfg.prompt_template) for q, c in zip(questions, prompted)]
        answers = generate_answers(self.generator, self.tokenizer, prompts, cfg.max_new_tokens, max(n, 1),
                                   cfg.do_sample, cfg.temperature, cfg.sample_top_k, cfg.top_p,
                                   add_special_tokens=cfg.prompt_template != CHAT, seed=cfg.seed,
                                   one_sentence=self.one_sentence, prompt_lookup=cfg.prompt_lookup)
        t3 = time.perf_counter()
        timings = {"retrieve_s": (t1 - t0) / n, "context_s": (t2 - t1) / n, "generate_s": (t3 - t2) / n,
                   "total_s": (t3 - t0) / n}
        return [{"question": q, "answer": a, "passages": h, "context_sentences": s, "context": c, "mode": mode,
                 "timings": dict(timings)}
                for q, a, h, s, c in zip(questions, answers, hits, sentence_lists, prompted)]


def load_passage_encoder(index_dir: Path, retriever, device: str, cfg: Config):
    """The model that embedded the index's passages, which also embeds context sentences (as in training).

    That is the retriever itself, except for a run trained with `query_only`: its index manifest names the
    frozen base retriever as `passage_encoder`, and only the question side was trained.
    """
    manifest = index_dir / MANIFEST_FILE
    spec = read_manifest(index_dir).get("passage_encoder") if manifest.is_file() else None
    if not spec:
        return retriever
    return load_retriever(spec, device=device, trust_remote_code=cfg.trust_remote_code).eval()


def temporary_index(retriever, corpus: str | Path, cfg: Config):
    """An in-memory Flat index over a passages JSONL, embedded with `retriever`."""
    passages = read_passages(corpus)
    emb = embed_texts(retriever, passage_texts(passages), cfg.embed_batch_size)  # (N, d)
    manifest = {"retriever": "in-memory", "dim": int(emb.shape[1]), "passages": len(passages),
                "index_factory": "Flat", "version": 0, "passages_file": str(corpus)}
    bm25 = Bm25Index.build(passage_texts(passages), cfg.bm25_stemmer)  # ~1 s per 10,000 passages
    return PassageIndex(index=make_faiss_index(emb, "Flat"), passages=passages, manifest=manifest, embeddings=emb,
                        bm25=bm25).configure(cfg, None)


_LOADED: dict[tuple, RAG] = {}


def answer(question: str, run: str | Path = "demo", top_k: int | None = None, **load_kw: Any) -> dict:
    """Answer with the run's pipeline, loaded on first use and reused for every later call in this process."""
    key = (str(run), tuple(sorted((k, str(v)) for k, v in load_kw.items())))
    if key not in _LOADED:
        _LOADED[key] = RAG.load(run, **load_kw)
    return _LOADED[key].answer(question, top_k)


def format_answer(out: dict, width: int = 100) -> str:
    """The answer and its sources as plain text (what `ask` prints)."""
    lines = [f"Q: {out['question']}", f"A: {out['answer']}", ""]
    for i, p in enumerate(out["passages"], 1):
        text = p["text"] if len(p["text"]) <= width else p["text"][:width - 3] + "..."
        lines.append(f"[{i}] {p['score']:.3f}  {p['title']}: {text}")
    if out["context_sentences"]:
        lines += ["", "context given to the generator:"] + [f"  - {s}" for s in out["context_sentences"]]
    t = out["timings"]
    lines += ["", f"({t['total_s']:.2f} s: retrieve {t['retrieve_s']:.2f}, context {t['context_s']:.2f}, "
                  f"generate {t['generate_s']:.2f})"]
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    """`python -m cozyrag_lib ask [--run=RUN] [--mode=rag|closed] [--json] [--key=value ...] QUESTION...`"""
    parsed = parse_command("ask", argv)
    for i, q in enumerate(parsed.options["question"], 1):
        if not q.strip():
            raise CozyError(f"ask: question {i} is empty")
    run_dir, base, load_kw = locate_run(parsed)  # every value checked before the models load (seconds)
    rag = RAG.load(run_spec(run_dir, base), **load_kw)
    for out in rag.answer_batch(parsed.options["question"], mode=parsed.options["mode"]):
        print(json.dumps(out, default=float) if parsed.options["json"] else format_answer(out) + "\n")
    return 0
