"""SQuAD v1.1 answer metrics and retrieval recall.

The normalisation is the official SQuAD v1.1 one: lower-case, drop punctuation, drop the articles
a/an/the, collapse whitespace. EM and F1 take the max over the gold answers.

    >>> normalize_answer("The  Eiffel-Tower!")
    'eiffeltower'
    >>> exact_match("the Eiffel Tower", ["Eiffel Tower", "Paris"])
    1.0
    >>> round(f1_score("Eiffel Tower in Paris", ["Eiffel Tower"]), 3)
    0.667
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


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
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:  # both empty counts as a match, one empty as a miss
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1 of the prediction, max over gold answers."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


def answer_in_text(golds: Iterable[str], text: str) -> bool:
    """True when a normalised gold answer occurs in the normalised text, on word boundaries."""
    t = f" {normalize_answer(text)} "
    return any(n and f" {n} " in t for n in (normalize_answer(g) for g in golds))


def answer_recall_at_k(golds: Sequence[str], passages: Sequence[str], k: int) -> float:
    """1.0 when a gold answer occurs in one of the first k passages."""
    return float(any(answer_in_text(golds, p) for p in passages[:k]))


def title_recall_at_k(gold_title: str, titles: Sequence[str], k: int) -> float:
    """1.0 when one of the first k passages comes from the gold article."""
    return float(gold_title in titles[:k])


def is_extractive(item: dict) -> bool:
    """True when a gold answer occurs in the item's own context (SQuAD, the built-in factoids)."""
    return answer_in_text(item["answers"], item.get("context") or "")


def evidence_recall_at_k(item: dict, passages: Sequence[dict], k: int) -> float:
    """1.0 when the item's gold evidence is in the first k passages ({"text", "title"} dicts).

    Extractive items (a gold answer occurs in their own context, as in SQuAD) need a passage that holds a
    gold answer; a title hit would be too easy there, since an article has many passages. Other items
    (the built-in QA, whose answers are article descriptions that rarely occur verbatim) need a passage
    from their article when they name one, else a passage that holds a gold answer.
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
