"""Stage 2: cut a corpus of articles into passages the retriever can embed whole.

    articles (title, text)  ->  sentences  ->  passages of <= chunk_max_tokens retriever tokens

The articles come from `cfg.corpus_sources` (`embedded`, wikiextractor folders, .jsonl, SQuAD .json; read by
`corpus.py`, streamed, so a whole Wikipedia dump never sits in memory).
Output, under `cfg.paths.passages_dir` (`{run_dir}/passages/`):
  * `passages.jsonl`  - `{"id", "title", "text"}` per line; ids are `{sha1(title)[:10]}-{n}`, the n-th
                        passage with that title, so identical input gives identical ids on any machine;
  * `summary.json`    - counts (articles, passages, dropped, skipped lines) per source, token stats;
  * `config.json`     - the resolved config.
A run of the earlier flat layout (`passages.jsonl` beside `qa/`) is moved into this one first.

Under torchrun every rank reads the same article stream and chunks every world_size-th article (the
tokenizer is the cost, reading is cheap); rank 0 merges the ranks' part files back into stream order,
so the output is byte-identical to a single-process run.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from . import distributed as dist
from .corpus import Source, embedded_corpus, read_articles, resolve_source
from .errors import CozyError
from .jsonio import iter_jsonl, write_json, write_jsonl
from .models import EMBEDDED_RETRIEVER, _quiet_transformers, offline_kw, package_file, set_offline
from .text import split_sentences

ARTICLES_PER_BATCH = 256  # articles tokenized together (one batched tokenizer call)


# ----------------------------------------------------------------------------------------------
# chunker

def load_retriever_tokenizer(spec: str, trust_remote_code: bool = False):
    """Only the tokenizer of a retriever spec (the model itself is not needed to count tokens)."""
    from transformers import AutoTokenizer  # slow to import: only when a tokenizer is needed

    _quiet_transformers()
    set_offline(spec)
    if spec.startswith("embedded:"):
        if spec != EMBEDDED_RETRIEVER:
            raise CozyError(f"unknown retriever '{spec}' (known: {EMBEDDED_RETRIEVER}, a folder or a hub name)")
        path = package_file(spec)
    else:
        path = Path(spec).expanduser()
        if spec.startswith((".", "/", "~")) and not path.exists():
            raise CozyError(f"{spec}: retriever folder not found")
    # sentence-transformers folders keep the tokenizer at the top, older ones in 0_Transformer/
    if path.is_dir() and not (path / "tokenizer_config.json").exists() and (path / "0_Transformer").is_dir():
        path = path / "0_Transformer"
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else spec, trust_remote_code=trust_remote_code,
                                            **offline_kw(spec))
    except (OSError, ValueError) as e:
        raise CozyError(f"retriever '{spec}': cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if not tok.is_fast:
        raise CozyError(f"retriever '{spec}': chunking needs a fast (Rust) tokenizer for token offsets")
    return tok


def article_sentences(text: str) -> list[str]:
    """Sentences of an article; a line break (a paragraph or heading) always ends a sentence."""
    return [s for line in text.splitlines() for s in split_sentences(line)]


def pack_sentences(n: int, fits: Callable[[int, int], bool], overlap: int) -> list[tuple[int, int]]:
    """Greedy spans [i, j) of n sentences: each as long as `fits(i, j)` allows, the next one starting
    `overlap` sentences back (fewer if the overlap would leave no room for a new sentence).
    A single sentence always counts as fitting (longer ones were split before).

    >>> pack_sentences(5, lambda i, j: j - i <= 2, overlap=1)
    [(0, 2), (1, 3), (2, 4), (3, 5)]
    >>> pack_sentences(5, lambda i, j: j - i <= 3, overlap=0)
    [(0, 3), (3, 5)]
    """
    spans, start, end = [], 0, 0
    while end < n:
        end += 1  # always take one new sentence
        while end < n and fits(start, end + 1):
            end += 1
        spans.append((start, end))
        if end == n:
            break
        start = max(end - overlap, start + 1)
        while start < end and not fits(start, end + 1):
            start += 1
    return spans


class Chunker:
    """Cut article text into passages of at most `max_tokens` retriever tokens, on sentence boundaries.

    Args:
        tokenizer: a fast Hugging Face tokenizer (the retriever's); tokens are counted without
            special tokens ([CLS]/[SEP] come on top when the retriever encodes a passage).
        max_tokens: passage length limit (cfg.chunk_max_tokens).
        overlap_sentences: sentences repeated at the start of the next passage of an article.
    Very short passages are kept here; the stage drops them (cfg.min_passage_chars).

    Example:
        >>> chunker = Chunker(load_retriever_tokenizer("embedded:all-minilm-l6-v2"), 32, 1)
        >>> chunker.chunk("Paris is the capital of France. It lies on the Seine. ...")  # doctest: +SKIP
        ['Paris is the capital of France. It lies on the Seine.', ...]
    """

    def __init__(self, tokenizer, max_tokens: int, overlap_sentences: int = 1):
        self.tokenizer, self.max_tokens, self.overlap = tokenizer, max_tokens, overlap_sentences
        self.long_sentences = 0  # sentences over the budget, split on token boundaries
        self.repacked = 0  # articles re-packed with exact counts (tokenizers where counts do not add up)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Retriever tokens per text, one batched tokenizer call."""
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]
        return [len(x) for x in ids]

    def chunk(self, text: str) -> list[str]:
        return [t for t, _ in self.chunk_batch([text])[0]]

    def chunk_batch(self, texts: list[str]) -> list[list[tuple[str, int]]]:
        """[(passage, n_tokens), ...] for each article text."""
        sentences = [article_sentences(t) for t in texts]
        counts = iter(self.count_tokens([s for ss in sentences for s in ss]))
        units = []  # per article: [(sentence or piece, n_tokens), ...], each within the budget
        for ss in sentences:
            units.append([])
            for s in ss:
                n = next(counts)
                if n <= self.max_tokens:
                    units[-1].append((s, n))
                else:
                    self.long_sentences += 1
                    units[-1].extend(self.split_long(s))
        # fast path: a passage's length is the sum of its sentences' lengths (true for WordPiece,
        # which splits on whitespace first); checked below with one more batched count
        packed = [self._pack_additive(u) for u in units]
        exact = iter(self.count_tokens([p for ps in packed for p in ps]))
        out = []
        for u, ps in zip(units, packed):
            n_tokens = [next(exact) for _ in ps]
            if any(n > self.max_tokens for n in n_tokens):
                self.repacked += 1
                ps = self._pack_exact([s for s, _ in u])
                n_tokens = self.count_tokens(ps)
            out.append(list(zip(ps, n_tokens)))
        return out

    def _pack_additive(self, units: list[tuple[str, int]]) -> list[str]:
        prefix = list(itertools.accumulate((n for _, n in units), initial=0))  # prefix[j] = tokens of units[:j]
        spans = pack_sentences(len(units), lambda i, j: prefix[j] - prefix[i] <= self.max_tokens, self.overlap)
        return [" ".join(s for s, _ in units[i:j]) for i, j in spans]

    def _pack_exact(self, units: list[str]) -> list[str]:
        """The plain reference: tokenize every candidate passage (slow, exact for any tokenizer)."""
        def fits(i, j):
            return self.count_tokens([" ".join(units[i:j])])[0] <= self.max_tokens

        return [" ".join(units[i:j]) for i, j in pack_sentences(len(units), fits, self.overlap)]

    def split_long(self, sentence: str) -> list[tuple[str, int]]:
        """Cut a sentence longer than the budget on token boundaries, preferring word starts.

        Pieces are slices of the original text (token offsets), re-counted: a piece that grows when
        re-tokenized (a word cut in the middle) is shortened, and if even one token of it is too long
        (a word fragment), the rest of the sentence is tokenized afresh from there. The one piece that
        can exceed the budget is a single character of more tokens than the budget (only budgets of 1–3).
        """
        pieces, text = [], sentence
        while text:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            T = len(offsets)  # offsets: (T, 2) character span of each token
            if T <= self.max_tokens:
                pieces.append((text, T))
                break

            def piece(start: int, end: int) -> str:  # the text of tokens [start, end) and the gap after them
                return text[offsets[start][0] if start else 0:offsets[end][0] if end < T else len(text)].strip()

            start = 0
            while start < T:
                end = min(start + self.max_tokens, T)
                if end < T:  # cut before a token that starts a word, if one is in reach
                    end = next((k for k in range(end, start, -1)
                                if offsets[k][0] > 0 and text[offsets[k][0] - 1].isspace()), end)
                n = self.count_tokens([piece(start, end)])[0]
                while n > self.max_tokens and end > start + 1:
                    end -= 1
                    n = self.count_tokens([piece(start, end)])[0]
                if n > self.max_tokens and start > 0:
                    break  # a word fragment over the budget on its own: re-tokenize from here
                if piece(start, end):  # (a first token over the budget cannot happen with WordPiece)
                    pieces.append((piece(start, end), n))
                start = end
            cut = offsets[start][0] if start < T else len(text)
            if cut == 0:  # the first character alone is over the budget (a budget of 1 and a character of 2
                cut = max(offsets[0][1], 1)  # tokens): it stands alone, over the budget, so the loop moves on
                pieces.append((text[:cut], self.count_tokens([text[:cut]])[0]))
            text = text[cut:].strip()
        return pieces


# ----------------------------------------------------------------------------------------------
# the stage

def chunk_corpus(cfg) -> dict:
    """Read cfg.corpus_sources, chunk every article, write `passages/` (passages.jsonl, summary.json,
    config.json) under cfg.run_dir; returns the summary. Runs the same under `python -m` and under torchrun."""
    if os.environ.get("RANK", "0") == "0":  # under torchrun one rank moves the files
        cfg.paths.upgrade()  # a run of the earlier flat layout: into passages/ before anything is read or written
    sources = [resolve_source(spec, cfg.corpus_columns) for spec in cfg.corpus_sources]  # bad paths fail before any work
    for source in sources:
        source.descriptions = cfg.embedded_descriptions
    if not sources:
        raise CozyError("config: corpus_sources is empty")
    with dist.process_group("cpu"):  # gloo: chunking needs only object collectives and a barrier
        return _chunk_corpus(cfg, sources)


def _chunk_corpus(cfg, sources: list[Source]) -> dict:
    started = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    chunker = Chunker(load_retriever_tokenizer(cfg.retriever, cfg.trust_remote_code),
                      cfg.chunk_max_tokens, cfg.chunk_overlap_sentences)
    out_dir = cfg.paths.passages_dir
    parts_dir = cfg.run_dir / ".passages.parts"  # the ranks' parts while they chunk (removed at the end)
    parts_dir.mkdir(parents=True, exist_ok=True)
    part = parts_dir / f"part-{rank:05d}.jsonl"
    dropped = [0] * len(sources)  # passages under min_passage_chars, per source (this rank's share)

    def flush(batch: list, f) -> None:
        """Chunk a batch of (article no, source no, title, text); append its passages to this rank's part."""
        for (a, s, title, _), passages in zip(batch, chunker.chunk_batch([b[3] for b in batch])):
            for text, n in passages:
                if len(text) < cfg.min_passage_chars:
                    dropped[s] += 1
                else:  # [article no, source no, n_tokens, title, text]: enough to merge and summarise
                    f.write(json.dumps([a, s, n, title, text], ensure_ascii=False) + "\n")
        batch.clear()

    try:
        # 1. every rank streams all articles and chunks its share: article a goes to rank a % world
        with open(part, "w", encoding="utf-8") as f, \
                tqdm(total=_known_total(sources, cfg.max_articles), unit="article", desc="chunk",
                     disable=rank != 0, delay=1) as bar:
            batch = []
            articles = ((s, title, text) for s, source in enumerate(sources)
                        for title, text in read_articles(source, cfg.max_articles))
            for a, (s, title, text) in enumerate(articles):
                bar.update()
                if a % world == rank:
                    batch.append((a, s, title, text))
                    if len(batch) == ARTICLES_PER_BATCH:
                        flush(batch, f)
            flush(batch, f)
        if rank == 0:
            _warn_skips(sources)

        # 2. rank 0 merges the parts in article order (= the single-process order) and assigns ids
        gathered = dist.all_gather_object(  # also the barrier: every part is complete on disk
            {"dropped": dropped, "long_sentences": chunker.long_sentences, "repacked": chunker.repacked})
        result = None
        if rank == 0:
            try:
                parts = [parts_dir / f"part-{r:05d}.jsonl" for r in range(world)]
                result = _merge(cfg, sources, parts, gathered)
                result.update(world_size=world, seconds=round(time.time() - started, 1))
                write_json(cfg.paths.summary(out_dir), result)
                cfg.save(cfg.paths.config(out_dir))
            except Exception as e:  # tell the other ranks, which wait in broadcast_object
                dist.broadcast_object(str(e) if isinstance(e, CozyError) else f"rank 0 failed: {e!r}")
                raise
        result = dist.broadcast_object(result)
        if isinstance(result, str):
            raise CozyError(result)
        return result
    finally:
        part.unlink(missing_ok=True)
        if rank == 0:
            shutil.rmtree(parts_dir, ignore_errors=True)


def _merge(cfg, sources: list[Source], parts: list[Path], gathered: list[dict]) -> dict:
    """Interleave the ranks' part files by article number into passages.jsonl; return the summary.

    Ids: `{sha1(title)[:10]}-{n}` with n counting passages of that title so far, so a title that
    comes twice (two SQuAD paragraphs, two sources) or a hash prefix shared by two titles still
    gives unique ids.
    """
    out = cfg.paths.passages
    seen = Counter()  # title hash -> passages so far (one small entry per distinct title)
    per_source = [0] * len(sources)
    lengths = Counter()  # n_tokens -> passages: a histogram, so stats need no list of 10^7 numbers
    files = [open(p, encoding="utf-8") for p in parts]

    def passages() -> Iterator[dict]:
        for a, s, n, title, text in heapq.merge(*[map(json.loads, pf) for pf in files], key=lambda r: r[0]):
            key = hashlib.sha1(title.encode("utf-8")).hexdigest()[:10]
            yield {"id": f"{key}-{seen[key]}", "title": title, "text": text}
            seen[key] += 1
            per_source[s] += 1
            lengths[n] += 1
        if not lengths:  # raised while write_jsonl writes: an existing passages.jsonl stays as it was
            raise CozyError(f"{', '.join(cfg.corpus_sources)}: no passages "
                            f"({sum(s.articles for s in sources)} articles read, every passage shorter "
                            f"than min_passage_chars={cfg.min_passage_chars})")

    try:
        write_jsonl(out, passages())
    finally:
        for pf in files:
            pf.close()
    dropped = [sum(g["dropped"][s] for g in gathered) for s in range(len(sources))]
    return {
        "passages": sum(per_source),
        "articles": sum(s.articles for s in sources),
        "dropped_short": sum(dropped),
        "skipped_lines": sum(s.skipped for s in sources),
        "sources": [{"source": src.spec, "kind": src.kind, "articles": src.articles, "passages": per_source[s],
                     "dropped_short": dropped[s], "skipped_lines": src.skipped, "skipped": src.skip_examples}
                    for s, src in enumerate(sources)],
        "tokens": {"limit": cfg.chunk_max_tokens, **_histogram_stats(lengths)},
        "long_sentences_split": sum(g["long_sentences"] for g in gathered),
        "articles_repacked": sum(g["repacked"] for g in gathered),
        "retriever": cfg.retriever,
        "overlap_sentences": cfg.chunk_overlap_sentences,
        "min_passage_chars": cfg.min_passage_chars,
        "path": str(out),
    }


def _histogram_stats(hist: Counter) -> dict:
    """min/mean/p50/p95/max of values given as a {value: count} histogram.

    >>> _histogram_stats(Counter({1: 1, 2: 2, 10: 1}))
    {'min': 1, 'mean': 3.75, 'p50': 2, 'p95': 10, 'max': 10}
    """
    values, total = sorted(hist), sum(hist.values())

    def quantile(q):
        rank = q * total
        for v, c in zip(values, itertools.accumulate(hist[v] for v in values)):
            if c >= rank:
                return v

    return {"min": values[0], "mean": round(sum(v * c for v, c in hist.items()) / total, 2),
            "p50": quantile(0.5), "p95": quantile(0.95), "max": values[-1]}


def _warn_skips(sources: list[Source]) -> None:
    for source in sources:
        for example in source.skip_examples:
            print(f"warning: {example}", file=sys.stderr)
        if source.skipped > len(source.skip_examples):
            print(f"warning: {source.spec}: {source.skipped - len(source.skip_examples)} more malformed lines skipped",
                  file=sys.stderr)


def _known_total(sources: list[Source], max_articles: int) -> int | None:
    """Articles to read when that is known up front (the embedded corpus), for the progress bar."""
    if any(s.kind != "embedded" for s in sources):
        return None
    n = len(embedded_corpus())
    return len(sources) * (min(n, max_articles) if max_articles else n)


# ----------------------------------------------------------------------------------------------
# reading passages back

def iter_passages(path: str | Path) -> Iterator[dict]:
    """Stream `{"id", "title", "text"}` passages from a passages.jsonl, checking every line."""
    path = Path(path)
    if not path.is_file():
        raise CozyError(f"{path}: passages file not found (run `python -m cozyrag_lib chunk` or notebook 02 first)")
    empty = True
    for n, p in iter_jsonl(path, fix="corrupt passages file? re-run chunking"):
        if not (isinstance(p, dict) and all(isinstance(p.get(k), str) for k in ("id", "title", "text"))):
            raise CozyError(f"{path}:{n}: expected an object with string 'id', 'title' and 'text'")
        empty = False
        yield p
    if empty:
        raise CozyError(f"{path}: no passages in file")


def read_passages(path: str | Path) -> list[dict]:
    """All passages of a passages.jsonl, in file order (row i of the index is passage i)."""
    return list(iter_passages(path))
