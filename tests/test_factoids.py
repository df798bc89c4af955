"""Factoid questions derived from the embedded corpus: the rules on hand-made articles, and the whole set."""
from collections import Counter, defaultdict

import pytest

from cozyrag_lib import qa
from cozyrag_lib.factoids import QTYPES, article_factoids, core_title, mention

# Hand-made articles in the corpus's shape, each with the factoids a reader would accept.
ARTICLES = [
    ({"title": "Paris", "topic": "Geography", "description": "Capital of France",
      "extract": "Paris is the capital and largest city of France, with an estimated city population of 2.04 million "
                 "in an area of 105.4 km2. It is on the Seine."},
     {("Paris",), ("2.04 million",)}),
    ({"title": "Pride and Prejudice", "topic": "Arts", "description": "1813 novel by Jane Austen",
      "extract": "Pride and Prejudice is a novel by English author Jane Austen. Written when she was aged 20, "
                 "it was her third novel and it was published in 1813."},
     {("Jane Austen",), ("1813",)}),
    ({"title": "Bertolt Brecht", "topic": "People", "description": "German playwright and poet (1898–1956)",
      "extract": "Eugen Berthold Friedrich Brecht, known as Bertolt Brecht, was a German theatre practitioner, "
                 "playwright, and poet. He was born in Augsburg, Bavaria."},
     {("Bertolt Brecht",), ("Augsburg, Bavaria",)}),
    ({"title": "Iron", "topic": "Physical sciences", "description": "Chemical element with symbol Fe",
      "extract": "Iron is a chemical element; it has symbol Fe and atomic number 26. It is a metal."},
     {("Fe",), ("26",)}),  # one of the two, picked by a hash of the title
    ({"title": "Budgerigar", "topic": "Biology and health sciences", "description": "Species of bird",
      "extract": "The budgerigar, also known as the common parakeet, is a small parrot."},
     {("the common parakeet",)}),
]


@pytest.mark.parametrize("art, expected", ARTICLES, ids=[a["title"] for a, _ in ARTICLES])
def test_rules_on_hand_made_articles(art, expected):
    got = article_factoids(art)
    assert got, "no factoid derived"
    for f in got:
        assert f.qtype in QTYPES and f.qtype != "description"
        assert all(a in art["extract"] for a in f.answers)  # every gold answer verbatim in the article
        assert f.question.endswith(("?", ".")) and "  " not in f.question
    assert {(f.answers[0],) for f in got} & expected, (expected, got)  # the wording varies by a hash of the title


def test_sentences_about_something_else_give_no_factoid():
    # the population and the naming belong to other things than the article's subject
    art = {"title": "Precambrian", "topic": "History", "description": "Earliest part of Earth's history",
           "extract": "The Precambrian is the earliest part of Earth's history. The Precambrian is so named because it "
                      "preceded the Cambrian, which is named after Cambria. The region has a metropolitan area "
                      "with a population of 300,000."}
    assert article_factoids(art) == []


def test_nationality_needs_the_description_and_the_text_to_agree():
    art = {"title": "Ann Smith", "topic": "People", "description": "Welsh poet (1900–1950)",
           "extract": "Ann Smith was a Scottish poet."}  # they disagree: no nationality question
    assert all(f.rule != "nationality" for f in article_factoids(art))


def test_titles_and_mentions():
    assert core_title("Skate (fish)") == "Skate" and core_title("Tyre, Lebanon") == "Tyre"
    assert mention("Holy Grail", "The Holy Grail is a treasure.") == "the Holy Grail"
    assert mention("Stethoscope", "The stethoscope is a device.") == "the stethoscope"
    assert mention("Paris", "Paris is a city.") == "Paris"


@pytest.fixture(scope="module")
def builtin_items():
    return qa.builtin_qa()[0]


def test_builtin_factoids_cover_every_type_with_answers_in_the_article(builtin_items):
    factoids = [it for it in builtin_items if it["qtype"] != "description"]
    counts = Counter(it["qtype"] for it in factoids)
    assert set(counts) == set(QTYPES) - {"description"} and min(counts.values()) >= 50, counts
    assert len(factoids) >= 2000
    for it in factoids:
        assert it["context"] and all(a in it["context"] for a in it["answers"]), it
        assert it["source"] == "builtin" and it["rule"]
    # varied wording: every rule with many questions uses more than one question opening
    openings = defaultdict(set)
    for it in factoids:
        openings[it["rule"]].add(" ".join(it["question"].split()[:2]))
    assert all(len(v) > 1 for r, v in openings.items() if sum(i["rule"] == r for i in factoids) >= 40), openings


def test_builtin_set_is_the_same_every_time_and_split_by_article(builtin_items):
    again, _ = qa.builtin_qa()
    assert again == builtin_items
    split_of_title = {}
    for it in builtin_items:  # the factoids follow their article's split: no test article is seen in training
        split_of_title.setdefault(it["title"], set()).add(qa.split_of(qa.split_key(it)))
    assert all(len(s) == 1 for s in split_of_title.values())
