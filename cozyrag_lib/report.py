"""Tables and plots of a run, for the notebooks and the README: markdown strings and matplotlib figures.

Tables are markdown strings (`display(Markdown(...))` in a notebook); every plot returns its figure and,
given a path, saves it as a PNG atomically (`save_figure`).

    >>> Markdown(summary_table([s for s, _ in compare(rags, items)]))        # doctest: +SKIP
    >>> plot_metrics("outputs/runs/demo")   # training curves -> plots/training.png   # doctest: +SKIP
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from .atomic import atomic_path
from .errors import CozyError
from .jsonio import read_jsonl
from .paths import SPLITS, RunPaths

# ----------------------------------------------------------------------------------------------
# markdown tables


def _cell(text) -> str:
    """Text for one markdown table cell: '-' when empty, floats to 3 places, pipes escaped, one line."""
    if text is None or text == "":
        return "-"
    if isinstance(text, float):
        return f"{text:.3f}"
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], align: str = "") -> str:
    """A markdown table; `align` holds one character per column ('r' right-aligns, anything else left).

    >>> print(markdown_table(["a", "b"], [[1, "x|y"], [0.5, None]], align="rl"))
    | a | b |
    |---:|---|
    | 1 | x\\|y |
    | 0.500 | - |
    """
    rule = "|" + "".join("---:|" if align[i:i + 1] == "r" else "---|" for i in range(len(header)))
    lines = ["| " + " | ".join(map(str, header)) + " |", rule]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(summaries: Sequence[dict], keys: Sequence[str] = ("model", "mode", "retrieval", "n", "em", "f1",
                                                                      "top5_accuracy", "answer_recall@5", "title_recall@5",
                                                                      "latency_p50_s")) -> str:
    """A markdown table of evaluation summaries ('-' where a metric does not apply)."""
    return markdown_table(keys, [[s.get(k) for k in keys] for s in summaries])


def group_table(summaries: Sequence[dict], by: str = "by_source") -> str:
    """A markdown table of each summary's per-group metrics, `by_source` or `by_type` (empty when there are none)."""
    rows = [(s, g, m) for s in summaries for g, m in s.get(by, {}).items()]
    if not rows:
        return ""
    head = "source" if by == "by_source" else "type"
    return markdown_table(["model", "mode", head, "n", "em", "f1", "answer_recall@5"],
                          [[s.get("model", s.get("run")), s["mode"], Path(g).name, m["n"], float(m["em"]),
                            float(m["f1"]), m.get("answer_recall@5")] for s, g, m in rows])


def source_table(summaries: Sequence[dict]) -> str:
    """`group_table` by QA source."""
    return group_table(summaries, "by_source")


def type_table(summaries: Sequence[dict]) -> str:
    """`group_table` by question type (description, person, place, date, number, thing)."""
    return group_table(summaries, "by_type")


def _round_robin(rows: Sequence[dict], n: int, seed: int) -> list[dict]:
    """`n` rows drawn with a seed, one question type after another, so rare types show up too."""
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
    return markdown_table(["type", "question", "gold", "answer", "EM", "from the sentence"],
                          [[p.get("qtype"), p["question"], " / ".join(p["answers"][:2]), p["prediction"],
                            f"{p['em']:.0f}", p.get("answer_sentence")] for p in _round_robin(predictions, n, seed)])


def qa_table(items: Sequence[dict], n: int = 8, seed: int = 0) -> str:
    """A markdown table of `n` QA items, a seeded draw taking each question type in turn."""
    return markdown_table(["type", "question", "answers", "title", "source"],
                          [[q.get("qtype"), q["question"], " / ".join(q["answers"]), q.get("title"), q.get("source")]
                           for q in _round_robin(items, n, seed)])


def qtype_split_table(summary: dict) -> str:
    """A markdown table of questions per type and split, from a prepare-qa summary ("" without types)."""
    rows = [(src, t, c) for src, st in summary["sources"].items() for t, c in st.get("qtype_splits", {}).items()]
    if not rows:
        return ""
    return markdown_table(["source", "type", *SPLITS], [[src, t, *(c[s] for s in SPLITS)] for src, t, c in rows],
                          align="ll" + "r" * len(SPLITS))


_KIND_NAMES = {"top_accuracy": "top-k accuracy (DPR)", "evidence_recall": "evidence", "answer_recall": "answer",
               "title_recall": "title"}


def recall_table(curves: dict[str, dict]) -> str:
    """A markdown table of `recall_at_ks` curves: one row per (retriever, kind), one column per k."""
    ks = next(iter(curves.values()))["k"]
    return markdown_table(["retriever", "recall", *(f"@{k}" for k in ks)],
                          [[name, _KIND_NAMES[kind], *map(float, c[kind])] for name, c in curves.items()
                           for kind in _KIND_NAMES if kind in c])


def passages_table(passages: Sequence[dict], n: int = 6, chars: int = 160) -> str:
    """The first `n` passages (id, title, the start of the text)."""
    return markdown_table(["id", "title", "text"], [[p["id"], p["title"], p["text"][:chars] + "…"] for p in passages[:n]])


def val_answers_table(run_dir: str | Path, last_only: bool = True, chars: int = 200) -> str:
    """The answers training gave to cfg.val_questions (the last generator phase's, or all)."""
    rows = read_jsonl(RunPaths(run_dir).val_answers, missing_ok=True)
    if rows and last_only:
        rows = [r for r in rows if r["step"] == rows[-1]["step"]]
    return markdown_table(["step", "question", "answer", "context"],
                          [[r["step"], r["question"], r["answer"], r["context"][:chars]] for r in rows], align="r")


# ----------------------------------------------------------------------------------------------
# plots (matplotlib; each returns the figure and saves a PNG atomically when given a path)


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path


def plot_recall(curves: dict[str, dict], path: str | Path | None = None):
    """Two panels against k, one line per retriever (e.g. dense (base), dense (trained), BM25, hybrid): DPR's
    top-k accuracy (a passage `has_answer`; CoZyRAG's stricter answer recall for curves without it), and
    gold evidence found (training's val_recall)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    dpr = all("top_accuracy" in c for c in curves.values())
    for label, c in curves.items():
        axes[0].plot(c["k"], c["top_accuracy"] if dpr else c["answer_recall"], marker="o", label=label)
        axes[1].plot(c["k"], c["evidence_recall"], marker="s", label=label)
    axes[0].set(title="top-k accuracy (DPR: a passage has the answer)" if dpr else "answer in a passage (SQuAD-normalised)",
                ylabel="share of test questions", ylim=(0, 1.02))
    axes[1].set(title="gold evidence in the top k (val_recall)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(curves[next(iter(curves))]["k"], [str(k) for k in curves[next(iter(curves))]["k"]])
        ax.set_xlabel("k (passages retrieved)")
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
    ax.set(ylabel="score", ylim=(0, 1), title="Answer quality on the test split")
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


def plot_metrics(run_dir: str | Path):
    """Loss, penalties, val_loss and recall@5 against step from train/metrics.jsonl; saved as plots/training.png."""
    from matplotlib.figure import Figure

    paths = RunPaths(run_dir)
    rows = read_jsonl(paths.metrics, fix="train again", missing_ok=True)
    if not rows:
        raise CozyError(f"{paths.metrics}: no metrics; train first")
    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2).ravel()

    def curve(ax, key, rows_, label=None, **kw):
        pts = [(r["step"], r[key]) for r in rows_ if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label or key, **kw)

    steps = [r for r in rows if "loss" in r]
    gen, ret = [r for r in steps if r["phase"] == "generator"], [r for r in steps if r["phase"] == "retriever"]
    evals = [r for r in rows if "val_loss" in r]
    curve(axes[0], "loss", gen, "generator loss (total)", marker=".", ls="")
    curve(axes[0], "lm", gen, "generator answer NLL", marker=".", ls="")
    curve(axes[0], "retriever_loss", ret, "retriever loss", marker=".", ls="")
    for k in ("ngram_repeat", "keyword_overlap", "short_answer"):
        curve(axes[1], k, gen, marker=".", ls="")
    curve(axes[2], "val_loss", evals, marker="o")
    for k in ("val_recall@5", "val_answer_recall@5", "val_title_recall@5", "val_recall@1", "val_context_has_answer"):
        curve(axes[3], k, evals, marker="o")
    for mode in ("bm25", "hybrid"):  # runs with a BM25 index log every retrieval mode side by side
        curve(axes[3], f"val_recall@5_{mode}", evals, marker="x", ls="--")
    for ax, title in zip(axes, ["training loss", "generator penalties (unweighted)", "validation answer NLL",
                                "validation retrieval"]):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    save_figure(fig, paths.plots / "training.png")
    return fig
