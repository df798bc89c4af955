"""SQuAD-style metrics against hand-computed cases."""
import math

import pytest

from cozyrag_lib.metrics import (answer_in_text, answer_recall_at_k, evidence_recall_at_k, exact_match, f1_score,
                                 normalize_answer, percentile, title_recall_at_k)


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower", "eiffel tower"),      # article and case
    ("an apple a day", "apple day"),           # every article, not only the first
    ("Theatre", "theatre"),                    # 'the' inside a word stays
    ("  New\tYork \n City ", "new york city"), # whitespace collapsed
    ("U.S.A.", "usa"),                         # punctuation removed, not replaced
    ("rock-n-roll", "rocknroll"),
    ("", ""),
    ("the", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_takes_max_over_golds():
    assert exact_match("Paris", ["London", "paris."]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("", ["the"]) == 1.0  # both normalise to empty


def test_f1_hand_computed():
    # prediction: "denver broncos team" vs gold "the denver broncos": common 2, P=2/3, R=2/2 -> F1=0.8
    assert f1_score("Denver Broncos team", ["the Denver Broncos"]) == pytest.approx(0.8)
    # max over golds: second gold matches exactly
    assert f1_score("Broncos", ["Denver Broncos", "Broncos"]) == pytest.approx(1.0)
    # repeated tokens count with multiplicity: pred "a b b" vs gold "b" (no articles): common 1, P=1/3, R=1
    assert f1_score("x y y", ["y"]) == pytest.approx(0.5)
    assert f1_score("nothing here", ["Denver"]) == 0.0
    assert f1_score("", ["Denver"]) == 0.0


def test_answer_in_text_respects_word_boundaries():
    assert answer_in_text(["Paris"], "The capital is Paris, France.")
    assert not answer_in_text(["Paris"], "Parisian cafés")
    assert answer_in_text(["the Eiffel Tower"], "built the eiffel-tower? no: the Eiffel Tower in 1889")
    assert not answer_in_text([""], "anything")


def test_recall_at_k():
    passages = ["Berlin is big.", "Paris is the capital of France.", "Rome."]
    assert answer_recall_at_k(["Paris"], passages, 1) == 0.0
    assert answer_recall_at_k(["Paris"], passages, 2) == 1.0
    assert title_recall_at_k("France", ["Germany", "France"], 1) == 0.0
    assert title_recall_at_k("France", ["Germany", "France"], 5) == 1.0


def test_percentile():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 95) == 5.0
    assert percentile(list(range(101)), 95) == pytest.approx(95.0)
    assert math.isnan(percentile([], 50))


def test_evidence_recall_picks_the_hit_kind_per_item():
    passages = [{"title": "Paris", "text": "Paris is the capital."}, {"title": "Seine", "text": "It flows past the Eiffel Tower."}]
    # extractive (the answer is in the item's own context): the article alone is not enough
    squad = {"answers": ["Eiffel Tower"], "title": "Paris", "context": "Paris has the Eiffel Tower."}
    assert evidence_recall_at_k(squad, passages, 1) == 0.0
    assert evidence_recall_at_k(squad, passages, 2) == 1.0
    # descriptive (built-in): the answer never occurs verbatim, so the article is the evidence
    builtin = {"answers": ["Capital of France"], "title": "Paris", "context": "Paris is the capital."}
    assert evidence_recall_at_k(builtin, passages, 1) == 1.0
    assert evidence_recall_at_k({**builtin, "title": "Lyon"}, passages, 2) == 0.0
    # no title, no context: a passage holding the answer
    assert evidence_recall_at_k({"answers": ["capital"]}, passages, 1) == 1.0
