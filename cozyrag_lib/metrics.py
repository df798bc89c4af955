"""SQuAD v1.1 answer metrics, DPR's top-k retrieval accuracy, and CoZyRAG's own retrieval recall.

Two definitions of "the passage holds the answer", on purpose kept apart:
  * `has_answer` / `top_k_accuracy` - DPR's (Karpukhin et al. 2020, and every paper that reports "top-20
    accuracy"): Unicode NFD, DPR's SimpleTokenizer pattern `[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]` (runs of
    letters/digits/marks, or one other visible character), lower-cased, the answer's tokens as a contiguous
    run of the passage's tokens. "Einstein" matches "Einstein's", "three" matches "three-fold", "11" matches
    "4–11", and a gold answer "." matches any passage with a full stop.
  * `answer_in_text` / `answer_recall_at_k` - CoZyRAG's: both sides SQuAD-normalised (punctuation deleted,
    so "Einstein's" becomes "einsteins" and no longer holds "Einstein"), then a substring on word
    boundaries. An answer that normalises to nothing ("." or "the") never matches.
Both refuse "art" in "start". Only the first is comparable with published tables.

The SQuAD normalisation is the official v1.1 script's: lower-case, drop punctuation, drop the articles
a/an/the, collapse whitespace. EM and F1 take the max over the gold answers; F1 is the v1.1 script's, so
a prediction and a gold that both normalise to nothing score EM 1.0 but F1 0.0 (v2.0 would give F1 1.0).

    >>> normalize_answer("The  Eiffel-Tower!")
    'eiffeltower'
    >>> exact_match("the Eiffel Tower", ["Eiffel Tower", "Paris"])
    1.0
    >>> round(f1_score("Eiffel Tower in Paris", ["Eiffel Tower"]), 3)
    0.667
    >>> has_answer(["Einstein"], "Einstein's theory"), answer_in_text(["Einstein"], "Einstein's theory")
    (True, False)
"""
from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

import regex  # \p{...} classes; a transformers dependency

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# DPR's SimpleTokenizer (dpr/utils/tokenizers.py): alphanumeric runs, or any single non-space, non-control char
_DPR_TOKEN = regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)


def normalize_answer(s: str) -> str:
    """Lower-case, remove punctuation, articles and extra whitespace (SQuAD v1.1)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    """The official SQuAD v1.1 F1: no shared token (which includes both sides empty) scores 0."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1 of the prediction, max over gold answers."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


def answer_in_text(golds: Iterable[str], text: str) -> bool:
    """True when a normalised gold answer occurs in the normalised text, on word boundaries.

    CoZyRAG's own test (SQuAD normalisation on both sides), used by answer recall, evidence recall and
    context_has_answer; not DPR's `has_answer` (see the module docstring for where they differ).
    """
    t = f" {normalize_answer(text)} "
    return any(n and f" {n} " in t for n in (normalize_answer(g) for g in golds))


def answer_recall_at_k(golds: Sequence[str], passages: Sequence[str], k: int) -> float:
    """1.0 when a gold answer occurs in one of the first k passages."""
    return float(any(answer_in_text(golds, p) for p in passages[:k]))


def dpr_tokens(text: str) -> list[str]:
    """DPR's tokens of `text`: NFD, the SimpleTokenizer pattern, lower-cased.

    >>> dpr_tokens("Einstein's 4–11")
    ['einstein', "'", 's', '4', '–', '11']
    """
    return list(_dpr_tokens(text))


@functools.lru_cache(maxsize=1 << 16)  # recall@100 tests the same passages against many questions
def _dpr_tokens(text: str) -> tuple[str, ...]:
    return tuple(m.group().lower() for m in _DPR_TOKEN.finditer(unicodedata.normalize("NFD", text)))


def has_answer(golds: Iterable[str], text: str) -> bool:
    """DPR's has_answer (string match): a gold answer's tokens occur as a contiguous run of the text's tokens.

    A gold answer without tokens (empty or blank) matches nothing; DPR would match it everywhere.
    """
    tokens = _dpr_tokens(text)
    for gold in golds:
        g = _dpr_tokens(gold)
        if g and any(t == g[0] and tokens[i:i + len(g)] == g for i, t in enumerate(tokens[:len(tokens) - len(g) + 1])):
            return True
    return False


def answer_rank(golds: Sequence[str], passages: Sequence[str]) -> int | None:
    """1-based rank of the first passage that `has_answer`, or None."""
    return next((r for r, p in enumerate(passages, 1) if has_answer(golds, p)), None)


def top_k_accuracy(golds: Sequence[str], passages: Sequence[str], k: int) -> float:
    """DPR's top-k retrieval accuracy of one question: 1.0 when one of the first k passages `has_answer`."""
    return float(any(has_answer(golds, p) for p in passages[:k]))


def title_recall_at_k(gold_title: str, titles: Sequence[str], k: int) -> float:
    """1.0 when one of the first k passages comes from the gold article."""
    return float(gold_title in titles[:k])


def is_extractive(item: dict) -> bool:
    """True when a gold answer occurs in the item's own context (SQuAD, the built-in QA with its description line)."""
    return answer_in_text(item["answers"], item.get("context") or "")


def evidence_recall_at_k(item: dict, passages: Sequence[dict], k: int) -> float:
    """1.0 when the item's gold evidence is in the first k passages ({"text", "title"} dicts).

    Extractive items (a gold answer occurs in their own context, as in SQuAD) need a passage that holds a
    gold answer; a title hit would be too easy there, since an article has many passages. Other items
    (built-in descriptions on the bare leads, `embedded_descriptions = false`, which rarely occur verbatim)
    need a passage from their article when they name one, else a passage that holds a gold answer.
    """
    top = passages[:k]
    if item.get("title") and not is_extractive(item):
        return title_recall_at_k(item["title"], [p["title"] for p in top], k)
    return answer_recall_at_k(item["answers"], [p["text"] for p in top], k)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)
