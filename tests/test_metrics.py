"""SQuAD-style metrics against hand-computed cases."""
import math

import pytest

from cozyrag_lib.metrics import (answer_in_text, answer_rank, answer_recall_at_k, dpr_tokens, evidence_recall_at_k,
                                 exact_match, f1_score, has_answer, normalize_answer, percentile, title_recall_at_k,
                                 top_k_accuracy)


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


@pytest.mark.parametrize("prediction, gold", [("", ""), ("the", "a"), ("?!", "."), ("", "the")])
def test_both_empty_after_normalising_is_em_1_but_f1_0_as_in_squad_v11(prediction, gold):
    """The official v1.1 script: EM compares the normalised strings (equal), F1 finds no common token (0).
    The v2.0 script would give F1 1.0 here."""
    assert exact_match(prediction, [gold]) == 1.0
    assert f1_score(prediction, [gold]) == 0.0
    assert f1_score("", ["the", "Denver"]) == 0.0  # the max over golds does not bring the v2.0 rule back


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
    # descriptive (a built-in description on its bare lead): the answer is not in the context, so the article is the evidence
    builtin = {"answers": ["Capital of France"], "title": "Paris", "context": "Paris is the capital."}
    assert evidence_recall_at_k(builtin, passages, 1) == 1.0
    assert evidence_recall_at_k({**builtin, "title": "Lyon"}, passages, 2) == 0.0
    # no title, no context: a passage holding the answer
    assert evidence_recall_at_k({"answers": ["capital"]}, passages, 1) == 1.0


# ---- DPR's has_answer / top-k accuracy, where it differs from CoZyRAG's answer recall ----------------


@pytest.mark.parametrize("gold, text, dpr, ours", [
    ("Einstein", "Einstein's theory of relativity", True, False),  # "'" is its own DPR token; SQuAD drops it
    ("three", "a three-fold increase", True, False),               # "-" splits for DPR, is deleted by SQuAD
    ("11", "open 4–11 daily", True, False),                        # the en dash is not ASCII punctuation
    ("art", "start the engine", False, False),                     # neither matches inside a word
    (".", "It ends here.", True, False),                           # "." is a DPR token; SQuAD normalises it away
    (".", "no full stop", False, False),
    ("Eiffel Tower", "the eiffel tower, Paris", True, True),       # case-folded by both
    ("Tower Eiffel", "the Eiffel Tower", False, False),            # contiguous and in order
    ("café", "Cafe\u0301 de Flore", True, False),                 # NFD: a precomposed and a combining accent agree
])
def test_has_answer_against_the_squad_normalised_match(gold, text, dpr, ours):
    assert has_answer([gold], text) is dpr
    assert answer_in_text([gold], text) is ours


def test_dpr_tokens_follow_the_simple_tokenizer():
    assert dpr_tokens("Einstein's") == ["einstein", "'", "s"]
    assert dpr_tokens("three-fold, 4–11.") == ["three", "-", "fold", ",", "4", "–", "11", "."]
    assert dpr_tokens("  \t\n") == []


def test_top_k_accuracy_and_answer_rank():
    passages = ["Berlin is big.", "Einstein's theory.", "Paris."]
    assert top_k_accuracy(["Einstein"], passages, 1) == 0.0
    assert top_k_accuracy(["Einstein"], passages, 2) == 1.0
    assert answer_rank(["Einstein", "Paris"], passages) == 2
    assert answer_rank(["Rome"], passages) is None
    assert not has_answer([""], "anything") and not has_answer([], "anything")  # no tokens: no match
