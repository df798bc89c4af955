"""Notebook 05's helpers: the question box, comparison tables and plots saved as PNG under the run.

    >>> box = question_box(rag, "Who was Albert Einstein?")   # prints a plain answer, then shows the widget
    >>> rows = compare({"trained": rag, "base": base}, items, modes=("closed", "rag", "oracle"))
    >>> display(Markdown(summary_table(rows)))
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

from .atomic import atomic_path
from .evaluate import evaluate
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
# tables


def compare(rags: dict, items: Sequence[dict], modes: Sequence[str] = ("closed", "rag", "oracle"),
            batch_size: int = 8) -> list[tuple[dict, list[dict]]]:
    """Evaluate every (pipeline, mode) pair on the same items; [(summary, predictions), ...]."""
    rows = []
    for label, rag in rags.items():
        for mode in modes:
            if mode == "oracle" and not any(it.get("context") for it in items):
                continue
            summary, preds = evaluate(rag, items, mode, batch_size=batch_size)
            rows.append(({**summary, "model": label}, preds))
    return rows


def summary_table(summaries: Sequence[dict], keys: Sequence[str] = ("model", "mode", "n", "em", "f1", "answer_recall@5",
                                                                      "title_recall@5", "latency_p50_s")) -> str:
    """A markdown table of evaluation summaries ('-' where a metric does not apply)."""
    def cell(v) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(s.get(k)) for k in keys) + " |" for s in summaries]
    return "\n".join(lines)


def group_table(summaries: Sequence[dict], by: str = "by_source") -> str:
    """A markdown table of each summary's per-group metrics, `by_source` or `by_type` (empty when there are none)."""
    rows = [(s, g, m) for s in summaries for g, m in s.get(by, {}).items()]
    if not rows:
        return ""
    head = "source" if by == "by_source" else "type"
    lines = [f"| model | mode | {head} | n | em | f1 | answer_recall@5 |", "|---|---|---|---|---|---|---|"]
    for s, g, m in rows:
        ar = m.get("answer_recall@5")
        lines.append(f"| {s.get('model', s.get('run'))} | {s['mode']} | {Path(g).name} | {m['n']} | {m['em']:.3f} | "
                     f"{m['f1']:.3f} | {'-' if ar is None else f'{ar:.3f}'} |")
    return "\n".join(lines)


def source_table(summaries: Sequence[dict]) -> str:
    """`group_table` by QA source."""
    return group_table(summaries, "by_source")


def type_table(summaries: Sequence[dict]) -> str:
    """`group_table` by question type (description, person, place, date, number, thing)."""
    return group_table(summaries, "by_type")


def _cell(text) -> str:
    """Text for one markdown table cell: '-' when empty, pipes escaped, one line."""
    return "-" if text is None or text == "" else str(text).replace("|", "\\|").replace("\n", " ")


def _round_robin(rows: Sequence[dict], n: int, seed: int) -> list[dict]:
    """`n` rows drawn with a seed, one question type after another, so rare types show up too."""
    import random

    by_type: dict = {}
    for r in rows:
        by_type.setdefault(r.get("qtype") or "-", []).append(r)
    rng, pools = random.Random(seed), [list(v) for v in by_type.values()]
    for pool in pools:
        rng.shuffle(pool)
    picked = []
    while len(picked) < n and any(pools):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return picked


def answers_table(predictions: Sequence[dict], n: int = 12, seed: int = 0) -> str:
    """A markdown table of `n` predictions (a seeded draw, one per question type in turn): question, gold,
    answer, and the context sentence the answer came from."""
    lines = ["| type | question | gold | answer | EM | from the sentence |", "|---|---|---|---|---|---|"]
    for p in _round_robin(predictions, n, seed):
        lines.append(f"| {_cell(p.get('qtype'))} | {_cell(p['question'])} | {_cell(' / '.join(p['answers'][:2]))} | "
                     f"{_cell(p['prediction'])} | {p['em']:.0f} | {_cell(p.get('answer_sentence'))} |")
    return "\n".join(lines)


def qa_table(items: Sequence[dict], n: int = 8, seed: int = 0) -> str:
    """A markdown table of `n` QA items, a seeded draw taking each question type in turn."""
    picked = _round_robin(items, n, seed)
    lines = ["| type | question | answers | title | source |", "|---|---|---|---|---|"]
    lines += [f"| {_cell(q.get('qtype'))} | {_cell(q['question'])} | {_cell(' / '.join(q['answers']))} | "
              f"{_cell(q.get('title'))} | {_cell(q.get('source'))} |" for q in picked]
    return "\n".join(lines)


def qtype_split_table(summary: dict) -> str:
    """A markdown table of questions per type and split, from a prepare-qa summary ("" without types)."""
    rows = [(src, t, c) for src, st in summary["sources"].items() for t, c in st.get("qtype_splits", {}).items()]
    if not rows:
        return ""
    splits = ("train", "validation", "test")
    lines = ["| source | type | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
    lines += [f"| {src} | {t} | " + " | ".join(str(c[s]) for s in splits) + " |" for src, t, c in rows]
    return "\n".join(lines)


def recall_table(curves: dict[str, dict]) -> str:
    """A markdown table of `recall_at_ks` curves: one row per (retriever, kind), one column per k."""
    ks = next(iter(curves.values()))["k"]
    lines = ["| retriever | recall | " + " | ".join(f"@{k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for name, c in curves.items():
        for kind in ("evidence_recall", "answer_recall", "title_recall"):
            if kind in c:
                lines.append(f"| {name} | {kind.split('_')[0]} | " + " | ".join(f"{v:.3f}" for v in c[kind]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# plots (matplotlib; each returns the figure and saves a PNG atomically)


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path


def plot_recall(curves: dict[str, dict], path: str | Path | None = None):
    """Recall@k against k, one colour per retriever: gold evidence found (solid; training's val_recall),
    a gold answer in a passage (dashed)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        line, = ax.plot(c["k"], c["evidence_recall"], marker="o", label=f"{label}: gold evidence")
        ax.plot(c["k"], c["answer_recall"], marker="s", ls="--", color=line.get_color(), label=f"{label}: answer in passage")
    ax.set(xlabel="k (passages retrieved)", ylabel="recall@k", ylim=(0, 1.02), title="Retrieval recall on the test split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path:
        save_figure(fig, path)
    return fig


def plot_em_f1(summaries: Sequence[dict], path: str | Path | None = None):
    """Grouped EM / F1 bars, one group per (model, mode)."""
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{s['model']}\n{s['mode']}" for s in summaries]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels)), 4))
    ax.bar(x - 0.2, [s["em"] for s in summaries], 0.4, label="EM")
    ax.bar(x + 0.2, [s["f1"] for s in summaries], 0.4, label="F1")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set(ylabel="score", title="Answer quality on the test split")
    ax.legend()
    if path:
        save_figure(fig, path)
    return fig


def plot_latency(predictions: dict[str, list[dict]], path: str | Path | None = None):
    """Histogram of per-question latency for each labelled prediction list."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, preds in predictions.items():
        ax.hist([p["latency_s"] for p in preds], bins=30, alpha=0.6, label=label)
    ax.set(xlabel="seconds per question", ylabel="questions", title="Answer latency")
    ax.legend(fontsize=8)
    if path:
        save_figure(fig, path)
    return fig
