"""Stage 1: QA importers, the built-in set, splits, the prepare-qa stage and its errors."""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, run_cli
from cozyrag_lib import qa, qa_formats
from cozyrag_lib.config import load_config
from cozyrag_lib.corpus import embedded_corpus, embedded_text
from cozyrag_lib.errors import CozyError
from cozyrag_lib.factoids import QTYPES
from cozyrag_lib.paths import RunPaths

QA_FIXTURES = FIXTURES / "qa"


def reference_split(key: str) -> str:
    """The split rule written out again, independently of the library."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10
    return {0: "test", 1: "validation"}.get(bucket, "train")


def cfg_for(tmp_path: Path, sources: list[str], **kw):
    return load_config("tiny", out_root=str(tmp_path / "runs"), qa_sources=sources, **kw)


def read_splits(run_dir: Path) -> dict[str, list[dict]]:
    return {s: qa.read_qa(RunPaths(run_dir).qa_split(s)) for s in qa.SPLITS}


# ----------------------------------------------------------------------------------------------------------
# real data

def test_squad_real_file(squad_file, tmp_path):
    items, stats = qa_formats.load_qa_file(squad_file)
    raw = json.loads(squad_file.read_text())
    assert stats["format"] == "squad" and len(items) == stats["items"] == 8595 and stats["skipped"] == 0
    assert len({a["title"] for a in raw["data"]}) == 39
    assert len({i["id"] for i in items}) == 8595  # SQuAD ids kept as given
    first = raw["data"][0]["paragraphs"][0]["qas"][0]
    assert items[0]["id"] == first["id"] and items[0]["question"] == first["question"].strip()
    assert items[0]["context"] == raw["data"][0]["paragraphs"][0]["context"].strip()
    assert all(i["title"] and i["context"] and i["answers"] and i["source"] == squad_file.name for i in items)

    summary = qa.prepare_qa(cfg_for(tmp_path, [str(squad_file)]))
    splits = read_splits(tmp_path / "runs" / "tiny")
    # 30 questions are asked twice in the same article with the same answers
    assert summary["duplicates_dropped"] == 30 and summary["total"] == 8565
    assert summary["splits"] == {"train": 6043, "validation": 1954, "test": 568}
    assert {s: len(v) for s, v in splits.items()} == summary["splits"]
    titles_in = {s: {i["title"] for i in v} for s, v in splits.items()}
    for article in raw["data"]:  # every article in exactly one split, the one sha1 says
        homes = [s for s in qa.SPLITS if article["title"] in titles_in[s]]
        assert homes == [reference_split(article["title"])]
    assert sorted(len(v) for v in titles_in.values()) == [3, 8, 28]


def test_nq_real_file_splits_by_question(nq_file, tmp_path):
    items, stats = qa_formats.load_qa_file(nq_file)
    assert stats["format"] == "jsonl" and len(items) == 100 and stats["skipped"] == 0
    assert items[2]["answers"] == ["Salzburg, Austria", "Austria"]
    assert all("title" not in i and i["id"].startswith(nq_file.name + "-") for i in items)
    qa.prepare_qa(cfg_for(tmp_path, [str(nq_file)]))
    splits = read_splits(tmp_path / "runs" / "tiny")
    assert sum(len(v) for v in splits.values()) == 100
    for s, rows in splits.items():
        assert all(reference_split(r["question"]) == s for r in rows)
    assert {s: len(v) for s, v in splits.items()} == {"train": 82, "validation": 9, "test": 9}


# ----------------------------------------------------------------------------------------------------------
# hand-made fixtures

def test_qabot_fixture():
    path = QA_FIXTURES / "qabot.txt"
    items, stats = qa_formats.load_qa_file(path)
    assert stats["format"] == "qabot"
    assert [(i["question"], i["answers"]) for i in items] == [
        ("What is the capital of France?", ["Paris"]),
        ("Who wrote Hamlet?", ["William Shakespeare", "Shakespeare"]),  # two A: lines, two answers
        ("What does a wrapped answer look like?", ["It starts on one line and goes on here."]),
        ("Do lower-case prefixes work too?", ["yes"]),
    ]
    assert stats["skip_examples"] == [f"{path}:12: question without an answer (no 'A:' line)",
                                      f"{path}:14: empty question"]


def test_tsv_fixture():
    path = QA_FIXTURES / "qa.tsv"
    items, stats = qa_formats.load_qa_file(path)
    assert stats["format"] == "tsv"  # the header line is not a question
    assert [(i["question"], i["answers"]) for i in items] == [
        ("What is the capital of Italy?", ["Rome"]),
        ("Which planets are gas giants?", ["Jupiter", "Saturn"]),
        ("Who painted the Mona Lisa?", ["Leonardo da Vinci", "da Vinci"]),
        ("What is the boiling point of water at sea level?", ["100 °C"]),
    ]
    assert stats["skip_reasons"] == {"no tab between question and answer": 1, "empty question": 1}
    assert stats["skip_examples"] == [f"{path}:5: no tab between question and answer", f"{path}:6: empty question"]


def test_jsonl_fixture():
    path = QA_FIXTURES / "qa.jsonl"
    items, stats = qa_formats.load_qa_file(path)
    assert [i["answers"] for i in items] == [["Pacific Ocean"], ["Alexander Fleming", "Fleming"], ["water"], ["Paris"]]
    assert items[3] == {"id": "custom-1", "question": "Where is the Eiffel Tower?", "answers": ["Paris"],
                        "title": "Eiffel Tower", "context": "The Eiffel Tower is in Paris.", "source": "qa.jsonl"}
    assert [e.split(": ")[0] for e in stats["skip_examples"]] == [f"{path}:{n}" for n in (5, 6, 7, 8)]
    assert stats["skip_reasons"] == {"bad JSON": 1, "empty question": 1, "no 'answer' or 'answers'": 1,
                                     "not a JSON object": 1}


def test_squad_v2_fixture_skips_unanswerable():
    path = QA_FIXTURES / "squad_v2.json"
    items, stats = qa_formats.load_qa_file(path)
    assert [(i["id"], i["answers"], i["title"]) for i in items] == [
        ("a1", ["the sun"], "Alpha_Article"),  # repeated answer kept once
        ("b1", ["100 degrees Celsius", "100 degrees"], "Beta_Article")]
    assert items[0]["context"] == "The Earth orbits the sun once a year."
    assert stats["unanswerable"] == 1
    assert stats["skip_examples"] == [f"{path}: data[1].paragraphs[0].qas[1]: empty question"]


def test_ids_are_stable_and_content_based():
    a, _ = qa_formats.load_qa_file(QA_FIXTURES / "qa.tsv")
    b, _ = qa_formats.load_qa_file(QA_FIXTURES / "qa.tsv", fmt="tsv")
    assert [i["id"] for i in a] == [i["id"] for i in b]
    digest = hashlib.sha1("What is the capital of Italy?\nRome".encode()).hexdigest()[:12]
    assert a[0]["id"] == f"qa.tsv-{digest}"


def test_split_of_known_values():
    # fixed values: the rule must give the same split on every machine and Python version
    assert [qa.split_of(t) for t in ("Normans", "Geology", "Super_Bowl_50", "Steam_engine")] == \
        ["train", "test", "validation", "test"]
    keys = [f"key {n}" for n in range(2000)]
    assert all(qa.split_of(k) == reference_split(k) for k in keys)
    counts = Counter(qa.split_of(k) for k in keys)
    assert 140 < counts["test"] < 260 and 140 < counts["validation"] < 260


@pytest.mark.parametrize("name, text, fmt", [
    ("a.json", '{"version": "1.1", "data": []}', "squad"),
    ("a.json", '{"question": "q?", "answer": ["a"]}\n', "jsonl"),  # JSON lines named .json
    ("a.jsonl", '{"question": "q?", "answer": "a"}\n', "jsonl"),
    ("a.ndjson", '{"question": "q?", "answer": "a"}\n', "jsonl"),
    ("a.tsv", "q?\ta\n", "tsv"),
    ("a.txt", "\n\nQ: q?\nA: a\n", "qabot"),
    ("a.txt", "q?\ta\n", "tsv"),
    ("a.csv", "q?\t[\"a\"]\n", "tsv"),  # DPR-style .qa.csv files are tab-separated
    ("a", '{\n "data": []\n}', "squad"),
])
def test_detect_format(tmp_path, name, text, fmt):
    path = tmp_path / name
    path.write_text(text)
    assert qa_formats.detect_format(path) == fmt


def test_explicit_format_overrides_detection(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("Q: looks like qabot\tbut is tsv\n")
    assert qa_formats.detect_format(path) == "qabot"
    items, stats = qa_formats.load_qa_file(path, fmt="tsv")
    assert items[0]["question"] == "Q: looks like qabot" and stats["format"] == "tsv"


# ----------------------------------------------------------------------------------------------------------
# file-level errors: one line naming the file (and line)

SQUAD_OK = {"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [
    {"id": "1", "question": "q?", "answers": [{"text": "a"}]}]}]}]}


def squad_with(mutate) -> str:
    doc = json.loads(json.dumps(SQUAD_OK))
    mutate(doc)
    return json.dumps(doc)


MALFORMED = [
    # (file name, content, format, expected part of the message after the path)
    ("empty.json", b"", "auto", ": file is empty"),
    ("blank.tsv", b"  \n\n \t\n", "auto", ": file is empty"),
    ("binary.jsonl", b'{"question": "q", "answer": "a"}\n\x00\x01\x02', "auto", ": binary file (NUL byte at byte 33)"),
    ("latin1.tsv", "Q?\tok\nCaf\u00e9?\tyes\n".encode("latin-1"), "auto", ":2: not UTF-8 (byte 0xe9 at byte 9)"),
    ("bad.json", b'{"data": [\n  {"title": "x",,}\n]}', "auto", ":2: not valid JSON"),
    ("deep.json", b"[" * 100_000, "squad", ": not valid JSON"),
    ("list.json", b"[1, 2]", "squad", ": top level: expected an object, got an array"),
    ("nodata.json", b'{"version": "1.1"}', "auto", ": 'data' missing"),
    ("q.json", squad_with(lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("question")).encode(), "auto",
     ": data[0].paragraphs[0].qas[0]: 'question' missing"),
    ("id.json", squad_with(lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("id")).encode(), "auto",
     ": data[0].paragraphs[0].qas[0]: 'id' missing"),
    ("ctx.json", squad_with(lambda d: d["data"][0]["paragraphs"][0].update(context=["c"])).encode(), "auto",
     ": data[0].paragraphs[0].context: expected a string, got an array"),
    ("ans.json", squad_with(lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers=["a"])).encode(),
     "auto", ": data[0].paragraphs[0].qas[0].answers[0]: expected an object, got a string"),
    ("title.json", squad_with(lambda d: d["data"][0].update(title=3)).encode(), "auto",
     ": data[0].title: expected a string, got a number"),
    ("imp.json", squad_with(lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(is_impossible="no")).encode(),
     "auto", ": data[0].paragraphs[0].qas[0].is_impossible: expected true/false, got a string"),
    ("notab.tsv", b"no tab here\nnor here\n", "auto", ": no usable QA pairs in this tsv file (2 skipped, e.g. "),
    ("noanswer.txt", b"Q: a question\n\nQ: another\n", "auto", ": no usable QA pairs in this qabot file"),
    ("noq.jsonl", b'{"answer": "a"}\nnot json\n', "auto", ": no usable QA pairs in this jsonl file"),
    ("v2.json", squad_with(lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(is_impossible=True)).encode(),
     "auto", ": no usable QA pairs in this squad file (1 unanswerable)"),
    ("prose.txt", b"Just some prose.\nNothing else.\n", "auto", ": cannot tell the QA format"),
    ("a.tsv", b"q\ta\n", "xml", ": unknown QA format 'xml'"),
]


@pytest.mark.parametrize("name, content, fmt, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_is_one_line_error_naming_it(tmp_path, name, content, fmt, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CozyError) as e:
        qa_formats.load_qa_file(path, fmt)
    msg = str(e.value)
    assert msg.startswith(f"{path}:") and expected in msg and "\n" not in msg, msg


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CozyError, match=rf"^{tmp_path}/nope.json: QA file not found$"):
        qa_formats.load_qa_file(tmp_path / "nope.json")
    with pytest.raises(CozyError, match=rf"^{tmp_path}: is a folder"):
        qa_formats.load_qa_file(tmp_path)


def test_line_level_problems_are_counted_skips(tmp_path):
    path = tmp_path / "mixed.tsv"
    huge = "x" * (qa_formats.MAX_CHARS + 1)
    path.write_text("\n".join([
        "question\tanswer",           # 1 header
        "good one?\tyes",             # 2
        "no tab",                     # 3
        " \t whitespace question",    # 4
        "empty answer?\t   ",         # 5
        f"{huge}?\tlong",             # 6 huge line
        "",                           # 7 blank lines are not records
        "good two?\tno",              # 8
    ]) + "\n")
    items, stats = qa_formats.load_qa_file(path)
    assert [i["question"] for i in items] == ["good one?", "good two?"]
    assert stats["skip_reasons"] == {"no tab between question and answer": 1, "empty question": 1,
                                     "empty answer": 1, "line too long": 1}
    assert [e.split(": ")[0] for e in stats["skip_examples"]] == [f"{path}:{n}" for n in (3, 4, 5, 6)]

    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"question": huge, "answer": "a"}) + "\n"
                    + json.dumps({"question": "q?", "answer": "a", "context": huge}) + "\n")
    items, stats = qa_formats.load_qa_file(path)
    assert len(items) == 1 and len(items[0]["context"]) == len(huge)  # long contexts are fine
    assert stats["skip_reasons"] == {"question too long": 1}


def test_skip_examples_are_capped_but_all_counted(tmp_path):
    path = tmp_path / "many.tsv"
    path.write_text("ok?\tyes\n" + "no tab\n" * 100)
    items, stats = qa_formats.load_qa_file(path)
    assert len(items) == 1 and stats["skipped"] == 100 and len(stats["skip_examples"]) == qa_formats.MAX_EXAMPLES
    assert stats["skip_examples"][-1] == f"{path}:{qa_formats.MAX_EXAMPLES + 1}: no tab between question and answer"


# ----------------------------------------------------------------------------------------------------------
# the built-in set

@pytest.fixture(scope="module")
def builtin_full():
    return qa.builtin_qa()


def test_builtin_set_size_and_forms(builtin_full):
    every, stats = builtin_full
    items = [i for i in every if i["qtype"] == "description"]  # the factoids have tests of their own
    corpus = embedded_corpus()
    empty = sum(1 for a in corpus.values() if not a["description"].strip())
    assert len(items) == len(corpus) - empty and stats["skipped"] == empty
    assert stats["items"] == len(every) and all(i["qtype"] in QTYPES for i in every)
    assert 9_700 <= len(items) <= 10_000
    assert len({i["id"] for i in items}) == len(items) and len({i["question"] for i in items}) == len(items)
    forms = Counter()
    for i in items:
        art = corpus[i["title"]]
        assert i["answers"] == [art["description"].strip()] and i["context"] == embedded_text(art).strip()
        assert i["context"].startswith(f"{i['title']}: {i['answers'][0]}")  # the description line leads the lead
        if art["topic"] == "People":
            assert i["question"] == f"Who was {i['title']}?"
            forms["who"] += 1
        else:
            form = [f for f in qa.WHAT_FORMS if f.format(i["title"]) == i["question"]]
            assert len(form) == 1
            forms[form[0]] += 1
    assert all(n > 1000 for n in forms.values()) and len(forms) == 1 + len(qa.WHAT_FORMS)
    assert qa.builtin_question("Alvar Aalto", "People") == "Who was Alvar Aalto?"


def test_builtin_set_is_deterministic_and_honours_max_articles(builtin_full):
    items, _ = builtin_full
    first = qa.builtin_qa(max_articles=200)[0]
    titles = sorted(embedded_corpus())[:200]
    assert {i["title"] for i in first} <= set(titles) and sum(i["qtype"] == "description" for i in first) >= 190
    assert first == [i for i in items if i["title"] in set(titles)]  # same items, same order


def test_builtin_contexts_without_the_description_line_are_the_bare_leads(builtin_full):
    """`embedded_descriptions=false` changes the contexts only: same questions, answers and ids."""
    bare = qa.builtin_qa(max_articles=200, descriptions=False)[0]
    led = qa.builtin_qa(max_articles=200)[0]
    corpus = embedded_corpus()
    assert [(i["id"], i["question"], i["answers"]) for i in bare] == [(i["id"], i["question"], i["answers"]) for i in led]
    assert all(i["context"] == corpus[i["title"]]["extract"].strip() for i in bare)
    assert all(j["context"].endswith(i["context"]) and j["context"] != i["context"] for i, j in zip(bare, led))


@pytest.mark.parametrize("article, text", [
    ({"title": "Paris", "description": "Capital of France", "extract": "Paris is a city."},
     "Paris: Capital of France.\nParis is a city."),
    ({"title": "Q", "description": "  Is it  real? ", "extract": "Q is a film."}, "Q: Is it real?\nQ is a film."),
    ({"title": "X", "description": "", "extract": "X is a letter."}, "X is a letter."),
    ({"title": "Y", "description": "Letter", "extract": ""}, "Y: Letter."),
])
def test_embedded_text(article, text):
    assert embedded_text(article) == text
    assert embedded_text(article, description=False) == article["extract"]


# ----------------------------------------------------------------------------------------------------------
# the stage: files, summary, duplicates, caps, reading back

def test_prepare_qa_writes_artefacts(tiny_cfg):
    cfg = tiny_cfg
    cfg.qa_sources = ["builtin", str(QA_FIXTURES / "qa.tsv"), str(QA_FIXTURES / "qa.jsonl")]
    summary = qa.prepare_qa(cfg)
    n_builtin = len(qa.builtin_qa(200)[0])  # 198 descriptions (2 articles have none) and their factoids
    out = cfg.paths.qa
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "summary.json", "test.jsonl", "train.jsonl",
                                                     "validation.jsonl"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert json.loads((out / "config.json").read_text())["qa_sources"] == cfg.qa_sources
    splits = read_splits(cfg.run_dir)
    assert summary["total"] == sum(len(v) for v in splits.values()) == n_builtin + 4 + 4
    assert summary["sources"]["builtin"]["kept"] == n_builtin
    per_type = summary["sources"]["builtin"]["qtype_splits"]  # questions per type and split
    assert per_type["description"]["train"] + per_type["description"]["validation"] + per_type["description"]["test"] == 198
    assert sum(sum(v.values()) for v in per_type.values()) == n_builtin
    assert summary["rejected"] == 2 + 2 + 4 and len(summary["rejected_examples"]) == 8
    assert summary["rejected_reasons"]["empty question"] == 2
    for s, rows in splits.items():
        assert all(qa.split_of(r.get("title") or r["question"]) == s for r in rows)
        assert all(set(r) <= {"id", "question", "answers", "title", "context", "source", "qtype", "rule"} for r in rows)
    assert not list(out.parent.glob(".qa.*"))  # no temporary folders left behind


def test_duplicates_dropped_across_sources_and_max_qa(tmp_path):
    tsv = tmp_path / "dups.tsv"
    tsv.write_text("What is the capital of Italy?\tRome\nwhat is the capital of italy\trome.\n"
                   "What is the capital of Italy?\tMilan\n")
    summary = qa.prepare_qa(cfg_for(tmp_path, [str(QA_FIXTURES / "qa.tsv"), str(tsv)]))
    assert summary["duplicates_dropped"] == 2 and summary["total"] == 5  # Milan is a different answer set
    assert summary["sources"][str(tsv)]["duplicates"] == 2

    summary = qa.prepare_qa(cfg_for(tmp_path, ["builtin", "builtin"], max_qa=50))
    n_builtin = len(qa.builtin_qa(200)[0])
    assert summary["sources"]["builtin"]["kept"] == 50 and summary["sources"]["builtin"]["capped"] == n_builtin - 50
    assert summary["sources"]["builtin#2"]["duplicates"] == 50 and summary["sources"]["builtin#2"]["kept"] == 50
    assert summary["total"] == 100


def test_a_prepared_split_read_back_as_jsonl_keeps_source_and_type(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"id": "builtin-1", "question": "What is the capital of France?", "answers": ["Paris"],
                                "title": "Paris", "source": "builtin", "qtype": "place", "rule": "capital"}) + "\n"
                    + json.dumps({"question": "Who?", "answer": "Ann"}) + "\n")
    items, _ = qa_formats.load_qa_file(path)
    assert (items[0]["source"], items[0]["qtype"], items[0]["rule"]) == ("builtin", "place", "capital")
    assert items[1]["source"] == "test.jsonl" and "qtype" not in items[1]  # a plain file: named after itself


def test_read_qa_errors(tmp_path):
    with pytest.raises(CozyError, match=r"train.jsonl: QA split not found; run .*prepare-qa"):
        qa.read_qa(tmp_path / "train.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "question": "q", "answers": ["a"]}\n{"id": "2", "question": "q"\n')
    with pytest.raises(CozyError, match=rf"^{bad}:2: not valid JSON; rerun prepare-qa$"):
        qa.read_qa(bad)
    bad.write_text('{"id": "1", "question": "q", "answers": "a"}\n')
    with pytest.raises(CozyError, match=rf"^{bad}:1: not a QA record"):
        qa.read_qa(bad)


def test_prepare_qa_moves_a_run_of_the_flat_layout(tmp_path):
    cfg = cfg_for(tmp_path, [str(QA_FIXTURES / "qa.tsv")])
    flat = cfg.run_dir / "passages.jsonl"  # where the chunk stage wrote its passages before passages/
    flat.parent.mkdir(parents=True)
    flat.write_text('{"id": "old-0", "title": "Old", "text": "an earlier run"}\n', encoding="utf-8")
    qa.prepare_qa(cfg)
    assert not flat.exists() and "an earlier run" in cfg.paths.passages.read_text(encoding="utf-8")
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["passages", "qa"]


# ----------------------------------------------------------------------------------------------------------
# the command line

def test_cli_prepare_qa_ok(tmp_path):
    r = run_cli("prepare-qa", "--preset=tiny", f"--out_root={tmp_path}", f"--qa_sources={QA_FIXTURES / 'qa.tsv'}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total"] == 4 and RunPaths(tmp_path / "tiny").qa_split("train").is_file()


CLI_BAD = [
    ("missing.json", None, "QA file not found"),
    ("binary.tsv", b"\x00\xff\x00", "binary file"),
    ("latin1.txt", "Q: Caf\u00e9?\nA: yes\n".encode("latin-1"), ":1: not UTF-8"),
    ("keys.json", b'{"data": [{"paragraphs": []}]}', "data[0]: 'title' missing"),
    ("notab.tsv", b"no tab\n", "no usable QA pairs"),
]


@pytest.mark.parametrize("name, content, expected", CLI_BAD, ids=[c[0] for c in CLI_BAD])
def test_cli_bad_source_exits_2_and_leaves_output(tmp_path, name, content, expected):
    cfg = load_config("tiny", out_root=str(tmp_path), qa_sources=[str(QA_FIXTURES / "qa.jsonl")])
    qa.prepare_qa(cfg)
    before = {p.name: p.read_bytes() for p in cfg.paths.qa.iterdir()}
    bad = tmp_path / name
    if content is not None:
        bad.write_bytes(content)
    r = run_cli("prepare-qa", "--preset=tiny", f"--out_root={tmp_path}",
                f"--qa_sources={QA_FIXTURES / 'qa.tsv'},{bad}")
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {bad}") and r.stderr.count("\n") == 1 and expected in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert {p.name: p.read_bytes() for p in cfg.paths.qa.iterdir()} == before


def test_cli_unknown_format_is_config_error(tmp_path):
    r = run_cli("prepare-qa", "--preset=tiny", f"--out_root={tmp_path}", "--qa_format=xml")
    assert r.returncode == 2 and r.stderr.startswith("error: config: qa_format") and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------------------
# fuzz: whatever the bytes, the importers answer with items or a CozyError, nothing else

def _load_any(data: bytes, name: str, fmt: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            items, stats = qa_formats.load_qa_file(path, fmt)
        except CozyError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            return
        assert items and all(i["question"] == i["question"].strip() and i["question"] for i in items)
        assert all(i["answers"] and all(a.strip() == a and a for a in i["answers"]) for i in items)
        assert all(isinstance(i["id"], str) and i["source"] == name for i in items)
        json.dumps(items)  # what prepare_qa writes


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = st.sampled_from(["x.json", "x.jsonl", "x.tsv", "x.txt", "x"])
FMTS = st.sampled_from(["auto", *qa_formats.FORMATS])


@FUZZ
@given(data=st.binary(max_size=300), name=NAMES, fmt=FMTS)
def test_fuzz_bytes(data, name, fmt):
    _load_any(data, name, fmt)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("QA:\t\n {}[]\",qa?x\r\x0c\u2028é")) | st.characters(),
                    max_size=300), name=NAMES, fmt=FMTS)
def test_fuzz_text(text, name, fmt):
    _load_any(text.encode("utf-8", "surrogatepass"), name, fmt)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                        st.sampled_from(["data", "title", "paragraphs", "context", "qas", "id", "question",
                                         "answers", "answer", "text", "is_impossible"]), kids, max_size=5),
                    max_leaves=20)


WRONG = st.sampled_from([None, 0, 1.5, True, "s", " ", [], {}, ["a"], {"text": "a"}])


def maybe(valid):
    """Mostly the right shape, sometimes a wrong one: reaches deep into the SQuAD and JSONL checks."""
    return st.one_of(*[valid] * 7, WRONG)


TEXT = st.sampled_from(["q?", "An answer", " padded ", "", "   "]) | st.text(alphabet="ab ?\t\n", max_size=4)
SQUAD_ANSWER = st.fixed_dictionaries({"text": maybe(TEXT)})
SQUAD_QA = st.fixed_dictionaries(
    {"id": maybe(TEXT), "question": maybe(TEXT), "answers": maybe(st.lists(SQUAD_ANSWER, min_size=1, max_size=2))},
    optional={"is_impossible": maybe(st.booleans())})
SQUAD_PARA = st.fixed_dictionaries({"context": maybe(TEXT), "qas": maybe(st.lists(SQUAD_QA, min_size=1, max_size=3))})
SQUAD_ARTICLE = st.fixed_dictionaries({"title": maybe(TEXT),
                                       "paragraphs": maybe(st.lists(SQUAD_PARA, min_size=1, max_size=2))})
SQUAD_DOC = st.fixed_dictionaries({"data": maybe(st.lists(SQUAD_ARTICLE, min_size=1, max_size=2))})
OPTIONAL = {"id": maybe(TEXT), "title": maybe(TEXT), "context": maybe(TEXT)}
JSONL_RECORD = (
    st.fixed_dictionaries({"question": maybe(TEXT), "answer": maybe(TEXT | st.lists(TEXT, max_size=2))},
                          optional=OPTIONAL)
    | st.fixed_dictionaries({"question": maybe(TEXT), "answers": maybe(st.lists(TEXT | SQUAD_ANSWER, max_size=2))},
                            optional=OPTIONAL))


@FUZZ
@given(doc=SQUAD_DOC | SQUAD_DOC | JSON)
def test_fuzz_squad_shapes(doc):
    _load_any(json.dumps(doc).encode(), "x.json", "squad")


@FUZZ
@given(lines=st.lists(st.one_of(JSONL_RECORD, JSONL_RECORD, JSON), min_size=1, max_size=5))
def test_fuzz_jsonl_shapes(lines):
    _load_any("\n".join(json.dumps(x) for x in lines).encode(), "x.jsonl", "jsonl")


def test_seeded_sample_draws_from_the_whole_file_in_order():
    from cozyrag_lib.qa import seeded_sample

    items = [{"id": f"a{i}"} for i in range(50)] + [{"id": f"b{i}"} for i in range(50)]  # two sources, sorted
    drawn = seeded_sample(items, 20, seed=1)
    assert len(drawn) == 20 and drawn == seeded_sample(items, 20, seed=1)  # reproducible
    assert drawn != seeded_sample(items, 20, seed=2)
    assert [items.index(d) for d in drawn] == sorted(items.index(d) for d in drawn)  # file order kept
    assert {d["id"][0] for d in drawn} == {"a", "b"}  # not just the first source
    assert seeded_sample(items, 0, seed=1) == items and seeded_sample(items, 500, seed=1) == items
