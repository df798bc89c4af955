"""Notebook 05's interactive side: the question box, and `compare` (every pipeline x mode on the same items).

    >>> box = question_box(rag, "Who was Albert Einstein?")   # prints a plain answer, then shows the widget
    >>> rows = compare({"trained": rag, "base": base}, items, modes=("closed", "rag", "oracle"))
    >>> display(Markdown(report.summary_table([s for s, _ in rows])))
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

from .evaluate import evaluate, recall_at_ks, write_results
from .jsonio import write_json
from .rag import format_answer
from .text import split_sentences


# ----------------------------------------------------------------------------------------------
# the question box


def answer_html(out: dict) -> str:
    """The answer, the passages with scores, and the sentences given to the generator highlighted."""
    chosen = set(out["context_sentences"])
    parts = [f"<h3>{html.escape(out['answer']) or '<i>(empty answer)</i>'}</h3>",
             f"<p><small>{out['timings']['total_s']:.2f} s</small></p><ol>"]
    for p in out["passages"]:
        sents = [f"<mark>{html.escape(s)}</mark>" if s in chosen else html.escape(s) for s in split_sentences(p["text"])]
        parts.append(f"<li><b>{html.escape(p['title'])}</b> <small>({p['score']:.3f})</small><br>{' '.join(sents)}</li>")
    return "".join(parts) + "</ol>"


def question_box(rag, default_question: str = "Who was Albert Einstein?", top_k: int | None = None):
    """Print a plain answer to `default_question` (what papermill and nbval see), then return the widget.

    The text typed in the box is only ever passed to `rag.answer` as a string: nothing is evaluated.
    """
    import ipywidgets as w

    k = top_k or rag.cfg.top_k
    print(format_answer(rag.answer(default_question, k)))
    text = w.Text(value=default_question, placeholder="Ask a question", layout=w.Layout(width="60%"))
    slider = w.IntSlider(value=k, min=1, max=max(20, k), description="top-k")
    button = w.Button(description="Ask", button_style="primary")
    out = w.Output()

    def ask(_=None) -> None:
        out.clear_output()
        with out:
            from IPython.display import HTML, display

            question = text.value.strip()
            if not question:
                print("Type a question first.")
                return
            display(HTML(answer_html(rag.answer(question, slider.value))))

    button.on_click(ask)
    return w.VBox([w.HBox([text, slider, button]), out])


# ----------------------------------------------------------------------------------------------
# comparisons


def compare(rags: dict, items: Sequence[dict], modes: Sequence[str] = ("closed", "rag", "oracle"),
            batch_size: int = 8, out_dir: str | Path | None = None, split: str = "test") -> list[tuple[dict, list[dict]]]:
    """Evaluate every (pipeline, mode) pair on the same items; [(summary, predictions), ...].

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


def recall_curves(rags: dict, items: Sequence[dict], ks: Sequence[int] = (1, 2, 3, 5, 10, 20),
                  out: str | Path | None = None) -> dict[str, dict]:
    """`evaluate.recall_at_ks` for every pipeline on the same items ({label: curve}); saved as JSON to `out`."""
    curves = {label: recall_at_ks(rag, items, ks) for label, rag in rags.items()}
    if out is not None:
        write_json(out, curves)
    return curves
