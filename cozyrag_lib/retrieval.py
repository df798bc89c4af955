"""Question -> passages -> context -> prompt -> batch: the data path shared by training and answering.

    questions --retriever--> (n, d) --FAISS--> top-k passages per question
              --split into sentences, rank by similarity to the question--> best N sentences
              --cut to a generator-token budget--> context
    prompt = template.format(question, context); training adds answer + EOS (labels only there)

Example:
    >>> cache = SentenceCache(retriever)
    >>> q_emb, scores, ids = retrieve(retriever, pindex, ["Who was Albert Einstein?"], k=4)   # (1, d), (1, 4), (1, 4)
    >>> [context] = build_contexts(q_emb, ids, pindex.passages, cache, tokenizer, max_sentences=8, context_tokens=128)
    >>> prompt = format_prompt(tokenizer, "Who was Albert Einstein?", context)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from . import distributed
from .errors import CozyError
from .embedding import embed_corpus, embed_texts
from .metrics import answer_in_text
from .text import split_sentences

DEFAULT_TEMPLATE = "Q: {question}\nContext:\n{context}\nA: "
CHAT = "chat"  # prompt_template value that uses the tokenizer's chat template


# ----------------------------------------------------------------------------------------------
# retrieval


def retrieve(retriever, pindex, questions: Sequence[str], k: int, batch_size: int = 64, show_progress: bool = False,
             mode: str | None = None):
    """Top-k passages per question: (q_emb (n, d), scores (n, k), ids (n, k); id -1 = nothing found).

    mode: "dense" (FAISS), "bm25" or "hybrid" (reciprocal-rank fusion of both); None = the index's
    `retrieval` (the config key, set when the index was loaded), so every caller follows one setting.
    Questions are encoded a batch at a time (in every mode: the embeddings rank context sentences) and
    each batch is ONE search per list (`PassageIndex.search_questions`).
    """
    n = len(questions)
    dim, k = pindex.index.d, min(k, len(pindex))
    q_emb = np.zeros((n, dim), np.float32)
    scores, ids = np.zeros((n, k), np.float32), np.full((n, k), -1, np.int64)
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc="retrieve", unit="batch", leave=False,
                  disable=not (show_progress and distributed.is_main_process() and len(starts) > 1)):
        q = embed_texts(retriever, list(questions[s:s + batch_size]), batch_size, show_progress=False)  # (b, d)
        q_emb[s:s + len(q)] = q
        scores[s:s + len(q)], ids[s:s + len(q)] = pindex.search_questions(q, list(questions[s:s + batch_size]), k,
                                                                          mode)  # one search per batch
    return q_emb, scores, ids


def passage_sentences(text: str) -> list[str]:
    """The sentences context building ranks for a passage (the whole text when it has no sentence boundary)."""
    return split_sentences(text) or [text]


@dataclass
class SentenceVectors:
    """Every passage's sentence embeddings, made once beside an index (stage 3, training's final index).

    Rows `offsets[i]:offsets[i + 1]` of `vectors` ((S, d) float16 unit vectors, memory-mapped when loaded) are
    the sentences `passage_sentences(passages[i]["text"])`, embedded by the encoder that embedded the passages.
    """
    offsets: np.ndarray  # (N + 1,) int64
    vectors: np.ndarray  # (S, d) float16

    @classmethod
    def embed(cls, encoder, passages: Sequence[dict], batch_size: int = 64) -> "SentenceVectors":
        """Split every passage and embed each distinct sentence once (overlapping chunks repeat sentences),
        across ranks under torchrun; every rank gets the result."""
        split = [passage_sentences(p["text"]) for p in passages]
        offsets = np.zeros(len(passages) + 1, np.int64)
        np.cumsum([len(s) for s in split], out=offsets[1:])
        distinct = list(dict.fromkeys(s for sents in split for s in sents))
        row = {s: i for i, s in enumerate(distinct)}
        emb = embed_corpus(encoder, distinct, batch_size).astype(np.float16)  # (S_distinct, d)
        return cls(offsets, emb[[row[s] for sents in split for s in sents]])

    def __len__(self) -> int:
        return len(self.offsets) - 1


class SentenceCache:
    """Sentences of each passage and their retriever embeddings, encoded once per retriever state.

    `version` names the retriever state the embeddings belong to; `reset(version)` empties the
    cache when the retriever changed (training bumps the version after each retriever phase).
    With `stored` (an index's `SentenceVectors` and its passages), the sentences of the index's passages
    are read from there instead of encoded, for as long as the cache stays at `version` (they belong to it).
    """

    def __init__(self, retriever, batch_size: int = 64, version: int = 0,
                 stored: tuple[SentenceVectors, Sequence[dict]] | None = None):
        self.retriever, self.batch_size, self.version = retriever, batch_size, version
        self.sentences: dict[str, list[str]] = {}  # passage id -> sentences
        self.embeddings: dict[str, np.ndarray] = {}  # passage id -> (s, d) unit vectors
        self.encoded = 0  # sentences encoded so far (cache misses), for tests and logs
        self.reused = 0  # sentences read from `stored` instead
        self.stored, self.stored_version, self._rows = None, version, {}
        if stored is not None:
            self.stored, self._passages = stored
            self._rows = {p["id"]: i for i, p in enumerate(self._passages)}

    def reset(self, version: int, retriever=None) -> None:
        """Empty the cache; stored vectors stay in use only while `version` is the one they were made for."""
        self.version, self.sentences, self.embeddings = version, {}, {}
        if retriever is not None:
            self.retriever = retriever
        if version != self.stored_version:
            self.stored, self._rows = None, {}

    def _from_store(self, p: dict) -> bool:
        row = self._rows.get(p["id"])
        if row is None or self._passages[row]["text"] != p["text"]:
            return False
        sents = passage_sentences(p["text"])
        a, b = self.stored.offsets[row], self.stored.offsets[row + 1]
        if b - a != len(sents):  # split differently from when they were stored (another CoZyRAG version)
            return False
        self.sentences[p["id"]], self.embeddings[p["id"]] = sents, np.asarray(self.stored.vectors[a:b], np.float32)
        self.reused += len(sents)
        return True

    def add(self, passages: Sequence[dict]) -> None:
        """Split and encode the passages not seen yet (read from `stored` where it has them), all missing
        sentences in one batched pass."""
        todo = [p for p in {p["id"]: p for p in passages}.values() if p["id"] not in self.embeddings]
        todo = [p for p in todo if self.stored is None or not self._from_store(p)]
        if not todo:
            return
        split = [passage_sentences(p["text"]) for p in todo]
        flat = [s for sents in split for s in sents]
        emb = embed_texts(self.retriever, flat, self.batch_size, show_progress=False)  # (S, d)
        self.encoded += len(flat)
        start = 0
        for p, sents in zip(todo, split):
            self.sentences[p["id"]], self.embeddings[p["id"]] = sents, emb[start:start + len(sents)]
            start += len(sents)

    def reading_order(self, passage_ids: Sequence[str]) -> list[str]:
        """The sentences of the passages (added before), passage by passage in the given order."""
        return [s for pid in passage_ids for s in self.sentences[pid]]


def truncate_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """`text` cut to at most `max_tokens` tokens of `tokenizer` (decode, then re-check: BPE may re-merge).

    >>> truncate_tokens(tok, "one two three four", 2)   # doctest: +SKIP
    'one two'
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = max_tokens
    while len(ids) > max_tokens and n > 0:
        text = tokenizer.decode(ids[:n]).rstrip("\ufffd").strip()  # a cut inside a UTF-8 char leaves U+FFFD
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_tokens:
            return text
        n -= 1
    return "" if len(ids) > max_tokens else text


def rank_sentences(q_emb: np.ndarray, passage_ids: Sequence[str], cache: SentenceCache, max_sentences: int) -> list[str]:
    """The `max_sentences` sentences of the passages most similar to the question, best first.

    A sentence repeated in two passages (chunk overlap) counts once. Ties keep retrieval order.
    """
    texts, embs = [], []
    for pid in passage_ids:
        texts += cache.sentences[pid]
        embs.append(cache.embeddings[pid])
    if not texts:
        return []
    sims = np.concatenate(embs) @ q_emb  # (S,) cosine: both sides are unit vectors
    out, seen = [], set()
    for i in np.argsort(-sims, kind="stable"):
        if texts[i] not in seen:
            seen.add(texts[i])
            out.append(texts[i])
            if len(out) == max_sentences:
                break
    return out


def fit_context(tokenizer, ranked: list[str], context_tokens: int, reading: list[str] | None = None) -> str:
    """The context: `ranked` sentences (best first) joined and cut to `context_tokens`, so the best survive the
    cut. With `reading` (every sentence of the retrieved passages, in retrieval then reading order) the
    sentences that survived (the cut one as far as it got) are put in that order: the top passage leads and
    a sentence keeps its place after the one it follows ("It ..." after its subject).

    >>> fit_context(tok, ["It has 26 members.", "The club is in Oslo."], 128,
    ...             ["The club is in Oslo.", "It has 26 members."])   # doctest: +SKIP
    'The club is in Oslo. It has 26 members.'
    """
    text = truncate_tokens(tokenizer, " ".join(ranked), context_tokens)
    if reading is None:
        return text
    kept, rest = [], text
    for s in ranked:  # the sentences in `text`: whole, then the one the cut went through
        if not rest:
            break
        piece = s if rest.startswith(s) else rest
        kept.append((s, piece))
        rest = rest[len(piece):].lstrip()
    where = {}
    for i, s in enumerate(reading):
        where.setdefault(s, i)
    kept.sort(key=lambda sp: where.get(sp[0], len(reading)))
    return truncate_tokens(tokenizer, " ".join(piece for _, piece in kept), context_tokens)


def build_contexts(q_emb: np.ndarray, ids: np.ndarray, passages: Sequence[dict], cache: SentenceCache, tokenizer,
                   max_sentences: int, context_tokens: int, order: str = "relevance") -> list[str]:
    """One context per question from its retrieved passages: the `max_sentences` sentences most similar to the
    question, as many as fit `context_tokens`, best first (`order` "relevance") or in the passages' order
    ("passage"; `fit_context`).

    Args:
        q_emb: (n, d) unit question embeddings (from `retrieve`).
        ids: (n, k) retrieved passage rows; -1 entries are skipped.
        passages: row -> {id, title, text}.
        cache: sentence embeddings per passage id (filled here for the passages not seen yet).
        tokenizer: the generator's tokenizer; the budget is in its tokens.
    """
    rows = [[passages[j]["id"] for j in row if j >= 0] for row in ids]
    cache.add([passages[j] for row in ids for j in row if j >= 0])
    return [fit_context(tokenizer, rank_sentences(q, row, cache, max_sentences), context_tokens,
                        cache.reading_order(row) if order == "passage" else None)
            for q, row in zip(q_emb, rows)]


# ----------------------------------------------------------------------------------------------
# prompts


def format_prompt(tokenizer, question: str, context: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The generator's prompt; `template="chat"` wraps context and question in the tokenizer's chat template.

    >>> format_prompt(tok, "Who?", "Ann wrote it.")   # doctest: +SKIP
    'Q: Who?\\nContext:\\nAnn wrote it.\\nA: '
    """
    if template == CHAT:
        if not getattr(tokenizer, "chat_template", None):
            raise CozyError("config: prompt_template='chat' but the generator's tokenizer has no chat template")
        message = f"Answer the question using the context.\nContext:\n{context}\n\nQuestion: {question}"
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return template.format(question=question, context=context)


def encode_prompt(tokenizer, prompt: str, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """Token ids of a prompt; a chat template already holds its special tokens, a plain one gets the usual ones."""
    return tokenizer(prompt, add_special_tokens=template != CHAT)["input_ids"]


def words_before(tokenizer, answer_ids: Sequence[int]) -> list[int]:
    """For each answer position t (and the EOS after the last token), complete words of the answer before t.

    A word is complete once the text decoded from the tokens before t reaches its end.
    >>> words_before(tok, tok("New York City")["input_ids"])   # doctest: +SKIP
    [0, 1, 2, 3]
    """
    full = tokenizer.decode(list(answer_ids))
    ends = [m.end() for m in re.finditer(r"\S+", full)]
    out = []
    for t in range(len(answer_ids)):
        done = len(tokenizer.decode(list(answer_ids[:t])))  # characters decoded before position t
        out.append(sum(e <= done for e in ends))
    return out + [len(ends)]


def cut_middle(tokenizer, text: str, max_tokens: int, marker: str = " ... ") -> str:
    """`text` in at most about `max_tokens` tokens: its start and its end, joined by `marker` where the middle was.

    >>> cut_middle(tok, "one two three four five six seven eight", 5)   # doctest: +SKIP
    'one two ... seven eight'
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    keep = max_tokens - len(tokenizer(marker, add_special_tokens=False)["input_ids"])
    if keep <= 0:
        return ""
    head = tokenizer.decode(ids[: keep - keep // 2]).rstrip("\ufffd").rstrip()  # a cut inside a UTF-8 char: U+FFFD
    tail = tokenizer.decode(ids[len(ids) - keep // 2:]).lstrip("\ufffd").lstrip() if keep // 2 else ""
    return f"{head}{marker}{tail}".strip()


def fit_prompt(tokenizer, question: str, context: str, template: str, budget: int) -> list[int]:
    """Prompt token ids in at most `budget` tokens that still end with the template's answer cue (`A: `).

    The context is cut first, then the middle of the question; a template longer than the budget on its
    own loses its middle too, so the cue at its end survives.
    """
    def encode(q: str, c: str) -> list[int]:
        return encode_prompt(tokenizer, format_prompt(tokenizer, q, c, template), template)

    prompt_ids = encode(question, context)
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    n_question = len(tokenizer(question, add_special_tokens=False)["input_ids"])
    for _ in range(8):  # re-tokenising a cut text may differ by a token; a few tries settle it
        over = len(prompt_ids) - budget
        if over <= 0:
            return prompt_ids
        if n_context > 0:
            n_context = max(0, n_context - over)
            context = truncate_tokens(tokenizer, context, n_context)
        elif n_question > 0:
            n_question = max(0, n_question - over)
            question = cut_middle(tokenizer, question, n_question)
        else:
            break
        prompt_ids = encode(question, context)
    budget = max(1, budget)
    return prompt_ids[: budget - budget // 2] + prompt_ids[len(prompt_ids) - budget // 2:] if len(prompt_ids) > budget \
        else prompt_ids


def encode_example(tokenizer, question: str, context: str, answer: str, template: str = DEFAULT_TEMPLATE,
                   max_length: int = 256) -> dict:
    """Token lists for one training example: prompt, answer + EOS, question, words_before.

    Over `max_length`, the context is cut, then the middle of the question (`fit_prompt`): the prompt
    always ends with the answer cue. An answer longer than half of max_length is cut too (it keeps its EOS).
    """
    eos = tokenizer.eos_token_id
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: max_length // 2 - 1]
    prompt_ids = fit_prompt(tokenizer, question, context, template, max_length - len(answer_ids) - 1)
    return {
        "prompt_ids": prompt_ids,
        "answer_ids": answer_ids + [eos],
        "question_ids": tokenizer(question, add_special_tokens=False)["input_ids"],
        "words_before": words_before(tokenizer, answer_ids),
    }


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists to (B, max len): (values, bool mask of real entries)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


def collate(examples: list[dict], pad_id: int, eos_id: int) -> dict:
    """Pad encoded examples to the longest in the batch (dynamic padding), in the answer layout the losses use.

    Returns tensors:
        input_ids, attention_mask  (B, T)  prompt + answer + EOS, right-padded
        positions                  (B, L)  t whose hidden state predicts answer token l (prompt_len - 1 + l)
        answer_ids, answer_mask    (B, L)  answer + EOS, with its mask
        prefix_ids, prefix_mask    (B, P)  the prompt
        question_ids, question_mask(B, Q)
        words_before               (B, L)
    and `eos_id`, `n_tokens` (real input tokens).
    """
    seqs = [e["prompt_ids"] + e["answer_ids"] for e in examples]
    input_ids, attention_mask = _pad(seqs, pad_id)
    answer_ids, answer_mask = _pad([e["answer_ids"] for e in examples], eos_id)
    positions, _ = _pad([list(range(len(e["prompt_ids"]) - 1, len(e["prompt_ids"]) - 1 + len(e["answer_ids"])))
                         for e in examples], 0)
    prefix_ids, prefix_mask = _pad([e["prompt_ids"] for e in examples], pad_id)
    question_ids, question_mask = _pad([e["question_ids"] for e in examples], pad_id)
    words, _ = _pad([e["words_before"] for e in examples], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask.long(), "positions": positions,
            "answer_ids": answer_ids, "answer_mask": answer_mask, "prefix_ids": prefix_ids, "prefix_mask": prefix_mask,
            "question_ids": question_ids, "question_mask": question_mask, "words_before": words,
            "eos_id": eos_id, "n_tokens": int(attention_mask.sum())}


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device`. To a GPU they go through pinned (page-locked) memory: only from
    there is a non_blocking copy asynchronous, so it overlaps with the GPU's work on the previous step."""
    pin = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# gold passages


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def gold_passages(items: Sequence[dict], passages: Sequence[dict]) -> list[int]:
    """The passage row each QA item is known to come from, or -1.

    An item with a `title` maps to a passage of that article; with a `context` too (SQuAD paragraphs,
    the built-in article texts) it is the article's passage sharing most words with the context,
    a passage holding a gold answer winning ties. A title-only item takes the article's first passage.
    Items without a title have no known gold passage.

    >>> gold_passages([{"title": "Paris", "answers": ["x"]}], [{"title": "Rome", "text": "."}, {"title": "Paris", "text": "."}])
    [1]
    """
    by_title: dict[str, list[int]] = {}
    for row, p in enumerate(passages):
        by_title.setdefault(p["title"], []).append(row)
    out = []
    for item in items:
        rows = by_title.get(item.get("title") or "", [])
        if not rows:
            out.append(-1)
            continue
        context = _words(item.get("context") or "")

        def score(row: int) -> tuple[float, bool]:
            words = _words(passages[row]["text"])
            overlap = len(words & context) / max(1, len(words)) if context else 0.0
            return overlap, answer_in_text(item["answers"], passages[row]["text"])

        out.append(max(rows, key=lambda r: (score(r), -r)))  # best overlap, then answer, then first row
    return out
