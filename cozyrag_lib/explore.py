"""Notebook 05's interactive side: the question box, and `compare` (every pipeline x mode on the same items).

    >>> box = question_box(rag, "Who was Albert Einstein?")   # the box, opened on that answer (plain text without widgets)
    >>> rows = compare({"trained": rag, "base": base}, items, modes=("closed", "rag", "oracle"))
    >>> display(Markdown(report.summary_table([s for s, _ in rows])))
"""
from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Sequence

from .evaluate import evaluate, recall_at_ks, write_results
from .errors import first_line
from .jsonio import write_json
from .rag import format_answer
from .text import split_sentences


# ----------------------------------------------------------------------------------------------
# the question box


def answer_html(out: dict) -> str:
    """The question it answers, the answer, the passages with scores, and the sentences given to the
    generator highlighted. Everything the model or the user wrote is escaped, never rendered as markup."""
    chosen = set(out["context_sentences"])
    parts = [f"<p style='margin:0'><small>Q: {html.escape(out['question'])}</small></p>",
             f"<h3 style='margin-top:0.2em'>{html.escape(out['answer']) or '<i>(empty answer)</i>'}</h3>",
             f"<p><small>{out['timings']['total_s']:.2f} s</small></p><ol>"]
    for p in out["passages"]:
        sents = [f"<mark>{html.escape(s)}</mark>" if s in chosen else html.escape(s) for s in split_sentences(p["text"])]
        parts.append(f"<li><b>{html.escape(p['title'])}</b> <small>({p['score']:.3f})</small><br>{' '.join(sents)}</li>")
    return "".join(parts) + "</ol>"


def error_html(message: str) -> str:
    """One red line (what the box shows instead of a traceback)."""
    return f"<span style='color:#c62828'>error: {html.escape(message)}</span>"


BUSY_HTML = "<i>answering…</i>"
PLAIN_NOTE = ("(The question box as plain text: what a viewer without Jupyter widgets shows, and JupyterLab in a "
              "copy it does not trust. Run the notebook in JupyterLab (`./run_all.sh lab`) to ask your own questions; "
              "an executed copy shows its saved box once trusted, `jupyter trust FILE`, which ./run_all.sh does for "
              "the copies it writes.)")


def question_box(rag, default_question: str = "Who was Albert Einstein?", top_k: int | None = None):
    """The question box: a text field (Enter asks), a top-k slider, an Ask button, a status line and the answer.

    The box opens with the answer to `default_question`. Where no widget front end draws it (papermill,
    nbval, a notebook viewer) it displays as that answer in plain text, with a note saying why. While a
    question is answered the status line says "answering…"; an error is one red line there, never a
    traceback. The text typed in the box is only ever passed to `rag.answer` as a string: nothing is evaluated.
    """
    import ipywidgets as w

    k = top_k or rag.cfg.top_k
    first = rag.answer(default_question, k)
    text = w.Text(value=default_question, placeholder="Ask a question, press Enter", layout=w.Layout(width="60%"))
    slider = w.IntSlider(value=k, min=1, max=max(20, k), description="top-k")
    button = w.Button(description="Ask", button_style="primary")
    status = w.HTML()
    answer = w.HTML(answer_html(first))
    answered = [default_question.strip()]

    def ask(_=None) -> None:
        question = text.value.strip()
        if not question:
            status.value = error_html("type a question first")
            return
        status.value, button.disabled = BUSY_HTML, True
        try:
            out = rag.answer(question, slider.value)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, one line in the box
            status.value = error_html(first_line(e))
            return
        finally:
            button.disabled = False
        answer.value, status.value = answer_html(out), ""
        answered[0] = question

    def on_msg(_widget, content, _buffers) -> None:  # the text field sends "submit" when Enter is pressed
        if isinstance(content, dict) and content.get("event") == "submit":
            ask()

    def on_edit(change) -> None:  # the answer below belongs to another question now: say so
        if status.value != BUSY_HTML:
            status.value = "" if change["new"].strip() == answered[0] else "<small>press Enter (or Ask) to answer this question</small>"

    text.on_msg(on_msg)
    text.observe(on_edit, "value")
    button.on_click(ask)
    return _question_box_class()([w.HBox([text, slider, button]), status, answer],
                                 plain=format_answer(first) + "\n\n" + PLAIN_NOTE, parts=(text, slider, button, status, answer))


@functools.cache
def _question_box_class():
    """The box's class, made on first use (ipywidgets is imported only when a box is made)."""
    import ipywidgets as w

    class QuestionBox(w.VBox):
        """A VBox whose plain-text form is the first answer (what a front end without widgets shows)."""

        def __init__(self, children, plain: str, parts: tuple):
            super().__init__(children)
            self.plain = plain
            self.text, self.slider, self.button, self.status, self.answer = parts

        def _repr_mimebundle_(self, **kwargs):
            data = super()._repr_mimebundle_(**kwargs)
            if isinstance(data, tuple):  # (data, metadata) in some ipywidgets versions
                return ({**data[0], "text/plain": self.plain}, *data[1:])
            return {**(data or {}), "text/plain": self.plain}

    return QuestionBox


# ----------------------------------------------------------------------------------------------
# comparisons


def compare(rags: dict, items: Sequence[dict], modes: Sequence[str] = ("closed", "rag", "oracle"),
            batch_size: int | None = None, out_dir: str | Path | None = None, split: str = "test") -> list[tuple[dict, list[dict]]]:
    """Evaluate every (pipeline, mode) pair on the same items; [(summary, predictions), ...].

    batch_size: questions answered together (default: each pipeline's `eval_batch_size`).
    out_dir: each pair's summary and predictions are also written there, as `{label}-{mode}-{split}.json`
    and `.predictions.jsonl` (`evaluate.write_results`).
    """
    rows = []
    for label, rag in rags.items():
        for mode in modes:
            if mode == "oracle" and not any(it.get("context") for it in items):
                continue
            summary, preds = evaluate(rag, items, mode, batch_size=batch_size)
            rows.append(({**summary, "model": label}, preds))
            if out_dir is not None:
                write_results(rows[-1][0], preds, Path(out_dir) / f"{label}-{mode}-{split}.json")
    return rows


def retrieval_pipelines(base, trained) -> dict:
    """The retrieval comparison, labelled: dense with the base retriever, dense with the trained one, BM25, and
    the hybrid of BM25 and the trained retriever (the last three answer with the trained generator). A run
    without a BM25 index (built before BM25 support) gives the two dense ones.

    >>> curves = recall_curves(retrieval_pipelines(base, rag), test, ks=[1, 5, 20, 100])   # doctest: +SKIP
    """
    pipes = {"dense-base": base.with_retrieval("dense"), "dense-trained": trained.with_retrieval("dense")}
    if trained.pindex.has_bm25():
        pipes.update({"bm25": trained.with_retrieval("bm25"), "hybrid-trained": trained.with_retrieval("hybrid")})
    return pipes


def other_retrievals(pipes: dict, rag) -> dict:
    """The trained pipelines of `retrieval_pipelines` in every retrieval mode but `rag`'s own (which the
    base-vs-trained comparison already answers): bm25 and hybrid for a dense run, dense and bm25 for a hybrid one."""
    return {k: p for k, p in pipes.items() if k != "dense-base" and p.cfg.retrieval != rag.cfg.retrieval}


def recall_curves(rags: dict, items: Sequence[dict], ks: Sequence[int] = (1, 2, 3, 5, 10, 20),
                  out: str | Path | None = None) -> dict[str, dict]:
    """`evaluate.recall_at_ks` for every pipeline on the same items ({label: curve}), each by its own retrieval
    mode (see `retrieval_pipelines`); saved as JSON to `out`."""
    curves = {label: recall_at_ks(rag, items, ks) for label, rag in rags.items()}
    if out is not None:
        write_json(out, curves)
    return curves
