"""Notebook helpers: HTML rendering, the question box's plain fallback (explore); tables and PNG plots (report)."""
from types import SimpleNamespace

import pytest

from cozyrag_lib.explore import answer_html, question_box
from cozyrag_lib.report import (answers_table, passages_table, plot_em_f1, plot_latency, plot_recall,
                                qa_table, qtype_split_table, recall_table, source_table, summary_table, type_table)

OUT = {"question": "Who wrote it?", "answer": "Ann <b>", "mode": "rag",
       "passages": [{"id": "p1", "title": "Books", "text": "Ann wrote it. Cats sleep.", "score": 0.9}],
       "context_sentences": ["Ann wrote it."], "context": "Ann wrote it.",
       "timings": {"retrieve_s": 0.1, "context_s": 0.1, "generate_s": 0.2, "total_s": 0.4}}


class FakeRAG:
    cfg = SimpleNamespace(top_k=3)

    def __init__(self):
        self.asked = []

    def answer(self, question, top_k=None):
        self.asked.append((question, top_k))
        return {**OUT, "question": question}


def test_answer_html_highlights_chosen_sentences_and_escapes():
    h = answer_html(OUT)
    assert "<mark>Ann wrote it.</mark>" in h and "<mark>Cats sleep.</mark>" not in h
    assert "Ann &lt;b&gt;" in h  # model output is escaped, never rendered as markup
    assert "Q: Who wrote it?" in h  # the answer says which question it answers


def test_question_box_shows_a_plain_answer_without_front_end():
    rag = FakeRAG()
    box = question_box(rag, "What __import__('os')?")
    assert rag.asked == [("What __import__('os')?", 3)]  # the text is passed on as a string, never evaluated
    bundle = box._repr_mimebundle_()
    bundle = bundle[0] if isinstance(bundle, tuple) else bundle
    plain = bundle["text/plain"]  # what papermill, nbval and viewers without widgets show
    assert "A: Ann <b>" in plain and "[1] 0.900  Books" in plain and "./run_all.sh lab" in plain
    assert "application/vnd.jupyter.widget-view+json" in bundle  # and the box where widgets are drawn
    assert "Q: What __import__(&#x27;os&#x27;)?" in box.answer.value and box.status.value == ""


def _press_enter(box):
    box.text._handle_custom_msg({"event": "submit"}, [])  # what the front end sends on Enter


def test_question_box_enter_asks_and_the_answer_names_its_question():
    rag = FakeRAG()
    box = question_box(rag, "Who wrote it?")
    box.text.value = "Who wrote it? | really"
    assert "press Enter" in box.status.value  # the answer below is to the old question: said so
    seen = []
    rag.answer = lambda q, k=None: (seen.append(box.status.value), {**OUT, "question": q})[1]
    _press_enter(box)
    assert seen == ["<i>answering…</i>"]  # the status while it runs
    assert "Q: Who wrote it? | really" in box.answer.value and box.status.value == ""
    box.slider.value = 5
    box.button.click()  # the button asks the same way
    assert len(seen) == 2 and not box.button.disabled


def test_question_box_shows_errors_as_one_red_line():
    rag = FakeRAG()
    box = question_box(rag, "Who wrote it?")
    before = box.answer.value

    def broken(question, top_k=None):
        raise RuntimeError("CUDA out of memory.\nTraceback (most recent call last): ...")

    rag.answer = broken
    _press_enter(box)
    assert box.status.value == "<span style='color:#c62828'>error: CUDA out of memory.</span>"
    assert box.answer.value == before and not box.button.disabled
    box.text.value = "   "
    _press_enter(box)
    assert "type a question first" in box.status.value


BOX_CELL = """from types import SimpleNamespace
from cozyrag_lib.explore import question_box

class Fake:
    cfg = SimpleNamespace(top_k=2)

    def answer(self, question, top_k=None):
        return {"question": question, "answer": "Ann", "context_sentences": ["Ann wrote it."],
                "passages": [{"id": "p1", "title": "Books", "text": "Ann wrote it. Cats sleep.", "score": 0.9}],
                "timings": {"retrieve_s": 0.0, "context_s": 0.0, "generate_s": 0.0, "total_s": 0.0}}

question_box(Fake(), "Who wrote it?")"""


def executed_box_notebook(tmp_path):
    """A notebook holding only a question box (on a stand-in RAG), executed by papermill as run_all.sh does."""
    import subprocess
    import sys

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    src, out = tmp_path / "box.ipynb", tmp_path / "box_out.ipynb"
    nb = new_notebook(cells=[new_code_cell(BOX_CELL)],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, src)
    r = subprocess.run([sys.executable, "-m", "papermill", str(src), str(out), "-k", "python3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_an_executed_copy_keeps_the_box(tmp_path):
    import nbformat

    nb = nbformat.read(executed_box_notebook(tmp_path), as_version=4)
    result = nb.cells[0].outputs[-1]
    view = result["data"]["application/vnd.jupyter.widget-view+json"]
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert view["model_id"] in state  # the box's own model is stored, so JupyterLab draws it from the file
    html_values = [m["state"].get("value", "") for m in state.values() if m["model_name"] == "HTMLModel"]
    assert any("Q: Who wrote it?" in v and "<mark>Ann wrote it.</mark>" in v for v in html_values)
    # and a viewer without widgets shows the answer as text, saying why
    assert "A: Ann" in result["data"]["text/plain"] and "./run_all.sh lab" in result["data"]["text/plain"]


def test_summary_table():
    t = summary_table([{"model": "base", "mode": "closed", "n": 3, "em": 0.5, "f1": 0.25}], keys=("model", "mode", "n", "em", "answer_recall@5"))
    assert t.splitlines()[2] == "| base | closed | 3 | 0.500 | - |"


def test_source_table_one_row_per_summary_and_source():
    s = {"model": "trained", "mode": "rag", "by_source": {
        "builtin": {"n": 3, "em": 0.0, "f1": 0.5, "answer_recall@5": 0.25},
        "../shared/data/squad/dev.json": {"n": 2, "em": 0.5, "f1": 0.75, "answer_recall@5": 1.0}}}
    lines = source_table([s, {"model": "base", "mode": "closed"}]).splitlines()
    assert len(lines) == 4 and lines[3] == "| trained | rag | dev.json | 2 | 0.500 | 0.750 | 1.000 |"
    assert source_table([{"model": "base", "mode": "rag"}]) == ""


def test_type_table_and_answers_table():
    s = {"model": "trained", "mode": "rag", "by_type": {"date": {"n": 2, "em": 0.5, "f1": 0.5, "answer_recall@5": 1.0}}}
    assert type_table([s]).splitlines()[2] == "| trained | rag | date | 2 | 0.500 | 0.500 | 1.000 |"
    preds = [{"qtype": t, "question": f"Q{i}?", "answers": [f"a{i}"], "prediction": f"a{i}" if i % 2 else "x",
              "em": float(i % 2), "answer_sentence": f"It is a{i}." if i % 2 else None}
             for i, t in enumerate(["date", "date", "date", "person", "person", "thing"])]
    lines = answers_table(preds, n=4, seed=0).splitlines()
    assert lines[0] == "| type | question | gold | answer | EM | from the sentence |" and len(lines) == 6
    types = [line.split(" | ")[0].strip("| ") for line in lines[2:]]
    assert sorted(types[:3]) == ["date", "person", "thing"]  # one of each type before any type repeats
    assert answers_table(preds, n=4, seed=0) == "\n".join(lines)  # seeded: the same rows every time


def test_qa_tables():
    items = [{"qtype": "date", "question": "When? | why", "answers": ["1813"], "title": "P", "source": "builtin"},
             {"qtype": "description", "question": "What is P?", "answers": ["A novel"], "source": "builtin"}]
    lines = qa_table(items, n=5).splitlines()
    assert len(lines) == 4 and "When? \\| why" in qa_table(items) and "| description | What is P? | A novel | - |" in lines[2] + lines[3]
    summary = {"sources": {"builtin": {"qtype_splits": {"date": {"train": 3, "validation": 1, "test": 0}}},
                           "x.json": {}}}
    assert qtype_split_table(summary).splitlines()[2] == "| builtin | date | 3 | 1 | 0 |"
    assert qtype_split_table({"sources": {"x.json": {}}}) == ""


def test_passages_table_shows_the_start_of_each_passage():
    passages = [{"id": f"p{i}", "title": f"T|{i}", "text": "word " * 100} for i in range(9)]
    lines = passages_table(passages, n=3, chars=20).splitlines()
    assert lines[0] == "| id | title | text |" and len(lines) == 5
    assert lines[2] == "| p0 | T\\|0 | " + ("word " * 4) + "… |"


def test_recall_table_rows_per_retriever_and_kind():
    t = recall_table({"base": {"k": [1, 5], "evidence_recall": [0.5, 0.9], "answer_recall": [0.1, 0.25]},
                      "trained": {"k": [1, 5], "evidence_recall": [0.6, 0.95], "answer_recall": [0.2, 0.3]}})
    lines = t.splitlines()
    assert lines[0] == "| retriever | recall | @1 | @5 |" and len(lines) == 6
    assert lines[2] == "| base | evidence | 0.500 | 0.900 |" and lines[5] == "| trained | answer | 0.200 | 0.300 |"


def test_plots_are_written_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    plot_recall({"base": {"k": [1, 5], "evidence_recall": [0.5, 0.9], "answer_recall": [0.1, 0.3]}}, tmp_path / "r.png")
    fig = plot_em_f1([{"model": "base", "mode": "rag", "em": 0.1, "f1": 0.2}], tmp_path / "e.png")
    assert fig.axes[0].get_ylim() == (0, 1)  # scores on their whole range, comparable between runs
    plot_latency({"base": [{"latency_s": 0.1}, {"latency_s": 0.3}]}, tmp_path / "l.png")
    for name in ("r.png", "e.png", "l.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
