"""Tables as sources (tables.py): local Parquet, Arrow and CSV files as QA and corpus, columns mapped by
qa_columns / corpus_columns, through `datasets` streaming; hf: sources go through the same code with a hub."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cozyrag_lib import CozyError, load_config
from cozyrag_lib.chunking import chunk_corpus
from cozyrag_lib.jsonio import read_json
from cozyrag_lib.qa import prepare_qa, read_qa, split_of
from cozyrag_lib.tables import answer_texts, load_qa_table, open_table, parse_columns, QA_FIELDS, table_kind

from conftest import run_cli

SQUAD_ROWS = {  # the columns of the Hub's SQuAD (rajpurkar/squad): answers is a struct of lists
    "id": ["q1", "q2", "q3", "q4"],
    "title": ["Denver_Broncos", "Denver_Broncos", "Paris", "Paris"],
    "context": ["The Denver Broncos won Super Bowl 50.", "The Denver Broncos won Super Bowl 50.",
                "Paris is the capital of France.", "Paris is the capital of France."],
    "question": ["Who won Super Bowl 50?", "Which game did the Broncos win?", "What is the capital of France?",
                 "What is the capital of Spain?"],
    "answers": [{"text": ["Denver Broncos", "Broncos"], "answer_start": [4, 11]},
                {"text": ["Super Bowl 50"], "answer_start": [23]},
                {"text": ["Paris"], "answer_start": [0]},
                {"text": [], "answer_start": []}],  # SQuAD v2 style: unanswerable
}


def write_parquet(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return path


def test_squad_parquet_is_read_with_its_usual_columns(tmp_path):
    path = write_parquet(tmp_path / "squad.parquet", SQUAD_ROWS)
    items, stats = load_qa_table(str(path))
    assert [it["id"] for it in items] == ["q1", "q2", "q3"]
    assert items[0] == {"id": "q1", "question": "Who won Super Bowl 50?", "answers": ["Denver Broncos", "Broncos"],
                        "title": "Denver_Broncos", "context": "The Denver Broncos won Super Bowl 50.",
                        "source": "squad.parquet"}
    assert stats["items"] == 3 and stats["unanswerable"] == 1 and stats["format"] == "parquet"


def test_csv_columns_are_mapped_and_a_missing_column_is_named(tmp_path):
    path = tmp_path / "trivia.csv"
    path.write_text("query,gold,doc\nWho wrote Hamlet?,William Shakespeare,d1\nWhat is H2O?,water,d2\n", encoding="utf-8")
    items, _ = load_qa_table(str(path), ["question=query", "answers=gold"])
    assert [(it["question"], it["answers"]) for it in items] == [("Who wrote Hamlet?", ["William Shakespeare"]),
                                                                 ("What is H2O?", ["water"])]
    with pytest.raises(CozyError, match=r"trivia.csv: no answers column \(looked for answers, answer\); "
                                        r"columns: query, gold, doc; map one with qa_columns=answers=COLUMN"):
        load_qa_table(str(path))
    with pytest.raises(CozyError, match=r"no column 'missing' for question \(qa_columns\); columns: query, gold, doc"):
        load_qa_table(str(path), ["question=missing", "answers=gold"])


def test_arrow_stream_file_and_triviaqa_answers(tmp_path):
    path = tmp_path / "trivia.arrow"
    table = pa.table({"question": ["Which city is the capital of France?"],
                      "answer": [{"value": "Paris", "aliases": ["City of Paris"]}]})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)  # the Arrow format `datasets` itself writes (save_to_disk)
    items, _ = load_qa_table(str(path))
    assert items[0]["answers"] == ["Paris", "City of Paris"]


def test_answer_cells_and_column_options():
    assert answer_texts("Paris") == ["Paris"] and answer_texts(["a", "b"]) == ["a", "b"] and answer_texts(None) == []
    assert parse_columns([], QA_FIELDS, "qa_columns") == {}
    with pytest.raises(CozyError, match="qa_columns: 'question' is not field=column"):
        parse_columns(["question"], QA_FIELDS, "qa_columns")
    with pytest.raises(CozyError, match="qa_columns: unknown field 'answer'"):
        parse_columns(["answer=gold"], QA_FIELDS, "qa_columns")
    assert [table_kind(s) for s in ("hf:nq_open::validation", "x.PARQUET", "arrow:x.bin", "x.json")] == \
        ["hf", "parquet", "arrow", None]


def test_broken_and_missing_tables_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(CozyError, match=r"bad.parquet: cannot read this parquet table \(") as e:
        load_qa_table(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(CozyError, match="nope.parquet: file not found"):
        list(open_table(str(tmp_path / "nope.parquet")))


def test_prepare_qa_splits_a_parquet_source_by_title(tmp_path):
    path = write_parquet(tmp_path / "squad.parquet", SQUAD_ROWS)
    cfg = load_config("tiny", out_root=str(tmp_path / "runs"), run_name="r", qa_sources=[str(path)])
    summary = prepare_qa(cfg)
    assert summary["total"] == 3 and summary["unanswerable_skipped"] == 1
    for split in ("train", "validation", "test"):
        for item in read_qa(cfg.paths.qa_split(split)):
            assert split_of(item["title"]) == split


def test_prepare_qa_cli_maps_csv_columns_and_rejects_a_bad_table(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("q,a\nWho wrote Hamlet?,William Shakespeare\n", encoding="utf-8")
    common = ["prepare-qa", "--preset=tiny", f"--out_root={tmp_path / 'runs'}", "--run_name=r"]
    proc = run_cli(*common, f"--qa_sources={path}", "--qa_columns=question=q,answers=a")
    assert proc.returncode == 0, proc.stderr
    assert read_json(tmp_path / "runs" / "r" / "qa" / "summary.json")["total"] == 1
    proc = run_cli(*common, f"--qa_sources={path}")  # no column named question or query
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}: no question column (looked for question, query); columns: q, a; "
        f"map one with qa_columns=question=COLUMN"]


def test_corpus_from_parquet_streams_rows_as_articles(tmp_path):
    rows = {"name": ["Paris", "Paris", "Berlin", "Empty"],
            "body": ["Paris is the capital of France. It lies on the Seine.",
                     "Paris is the capital of France. It lies on the Seine.",  # SQuAD-style repeat: read once
                     "Berlin is the capital of Germany. It lies on the Spree.", ""]}
    path = write_parquet(tmp_path / "wiki.parquet", rows)
    cfg = load_config("tiny", out_root=str(tmp_path / "runs"), run_name="r", corpus_sources=[str(path)],
                      corpus_columns=["title=name", "text=body"])
    summary = chunk_corpus(cfg)
    passages = [json.loads(line) for line in cfg.paths.passages.read_text(encoding="utf-8").splitlines()]
    assert [p["title"] for p in passages] == ["Paris", "Berlin"]
    assert passages[1]["text"].startswith("Berlin is the capital of Germany.")
    source = summary["sources"][0]
    assert source["kind"] == "table" and source["articles"] == 2
    with pytest.raises(CozyError, match=r"wiki.parquet: no text column \(looked for text, context, passage, contents\)"):
        chunk_corpus(load_config("tiny", out_root=str(tmp_path / "runs"), run_name="r2", corpus_sources=[str(path)]))
