"""Evaluate a run on a QA file: SQuAD-style EM/F1, answer and title recall@k, latency.

    python -m cozyrag_lib evaluate --run outputs/runs/demo --qa outputs/runs/demo/qa/test.jsonl
    python -m cozyrag_lib evaluate --run base:outputs/runs/demo --qa ... --mode closed     # zero-shot, no context

It prints one JSON object and writes it (with --out, else to RUN/eval/<name>.json) beside a
per-question predictions JSONL (`<name>.predictions.jsonl`).

Metrics (means over the evaluated questions):
  em, f1                   SQuAD v1.1 normalisation, max over gold answers
  top{1,5,20,100}_accuracy DPR's top-k retrieval accuracy (rag mode): one of the first k passages `has_answer`
                           (NFD, DPR's tokenizer, lower-cased, contiguous tokens; `metrics.has_answer`) - the
                           number papers report, from one extra search of 100 passages per question
  answer_recall@{1,5,K}    CoZyRAG's own: a SQuAD-normalised gold answer occurs in one of the first k passages
                           (rag mode; stricter than DPR's: "Einstein" is not in "Einstein's")
  title_recall@{1,5}       one of the first k passages comes from the item's article (items with titles;
                           underscores in titles such as SQuAD's `Super_Bowl_50` count as spaces)
  latency_p50_s/_p95_s     per-question time, answering `batch_size` questions at a time (batch time / size)
  by_source, by_type       n, em, f1 (and answer_recall@5, top5_accuracy) per QA source and per question type
                           (`qtype`), when the items mix several
  retrieval, passages      the retrieval mode (`--retrieval=dense|bm25|hybrid`) and the corpus size searched

    python -m cozyrag_lib evaluate --run outputs/runs/demo --qa ... --retrieval=hybrid     # dense + BM25, fused
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from .cli import locate_run, parse_command, run_spec
from .errors import CozyError
from .jsonio import write_json, write_jsonl
from .metrics import (answer_in_text, answer_rank, answer_recall_at_k, evidence_recall_at_k, exact_match, f1_score,
                      normalize_answer, percentile, title_recall_at_k)
from .models import autocast
from .qa_formats import load_qa_file
from .tables import load_qa_table, table_kind
from .rag import RAG
from .retrieval import retrieve


TOP_KS = (1, 5, 20, 100)  # DPR's top-k accuracy is reported at these depths


def _title(t: str) -> str:
    return " ".join(t.replace("_", " ").split()).casefold()


def evaluate(rag, items: Sequence[dict], mode: str = "rag", top_k: int | None = None,
             batch_size: int | None = None, show_progress: bool = True) -> tuple[dict, list[dict]]:
    """(summary, predictions) of `rag` on QA items {question, answers, title?, context?}, answered `batch_size`
    questions at a time (default: the run's `eval_batch_size`)."""
    k, batch_size = top_k or rag.cfg.top_k, batch_size or rag.cfg.eval_batch_size
    if mode == "oracle":
        skipped = sum(1 for it in items if not it.get("context"))
        items = [it for it in items if it.get("context")]
        if not items:
            raise CozyError("oracle mode needs QA items with a gold context; this QA file has none")
    else:
        skipped = 0
    if not items:
        raise CozyError("no QA items to evaluate")
    preds: list[dict] = []
    top = top_accuracies(rag, items) if mode == "rag" else [{} for _ in items]  # DPR top-k, one search of 100
    starts = range(0, len(items), batch_size)
    for s in tqdm(starts, desc=f"evaluate {rag.name} {mode}", unit="batch", disable=not show_progress):
        chunk = items[s:s + batch_size]
        outs = rag.answer_batch([it["question"] for it in chunk], k, mode,
                                [it["context"] for it in chunk] if mode == "oracle" else None)
        preds += [prediction_row(it, out, mode, k, top[len(preds) + n]) for n, (it, out) in enumerate(zip(chunk, outs))]
    where = {"retrieval": rag.pindex.retrieval, "passages": len(rag.pindex)} if mode == "rag" else {}
    summary = summarise(preds, mode, k, run=rag.name, **where)
    if skipped:
        summary["skipped_without_context"] = skipped
    return summary, preds


def prediction_row(it: dict, out: dict, mode: str, k: int, top: dict) -> dict:
    """One line of the predictions JSONL: the answer, its scores, the passages, where the answer came from."""
    texts = [p["text"] for p in out["passages"]]
    titles = [_title(p["title"]) for p in out["passages"]]
    row = {"id": it.get("id"), "source": it.get("source"), "qtype": it.get("qtype"),
           "question": it["question"], "answers": it["answers"],
           "prediction": out["answer"], "em": exact_match(out["answer"], it["answers"]),
           "f1": f1_score(out["answer"], it["answers"]), "latency_s": out["timings"]["total_s"],
           "passages": [{"id": p["id"], "title": p["title"], "score": p["score"]} for p in out["passages"]],
           "answer_sentence": answer_sentence(out["answer"], out.get("context_sentences") or [])}
    if mode != "closed":  # is a gold answer in the context the generator was given (after the cuts)?
        row["context_has_answer"] = float(answer_in_text(it["answers"], out["context"]))
    if mode == "rag":
        row.update(top)  # this item's top{k}_accuracy
        for kk in sorted({1, 5, k}):
            row[f"answer_recall@{kk}"] = answer_recall_at_k(it["answers"], texts, kk)
        if it.get("title"):
            for kk in (1, 5):
                row[f"title_recall@{kk}"] = title_recall_at_k(_title(it["title"]), titles, kk)
    return row


def _mean(key: str, rows: Sequence[dict]) -> float | None:
    vals = [p[key] for p in rows if key in p]
    return round(sum(vals) / len(vals), 4) if vals else None


def summarise(preds: Sequence[dict], mode: str, k: int, run: str = "", **head) -> dict:
    """Means over the predictions (EM, F1, retrieval metrics that apply to the mode), latency percentiles, and
    the same per QA source and per question type when there are several; `head` (retrieval settings) after F1."""
    summary = {"run": run, "n": len(preds), "mode": mode, "top_k": k, "em": _mean("em", preds), "f1": _mean("f1", preds),
               **head}
    if mode == "rag":
        for kk in TOP_KS:
            summary[f"top{kk}_accuracy"] = _mean(f"top{kk}_accuracy", preds)
        for kk in sorted({1, 5, k}):
            summary[f"answer_recall@{kk}"] = _mean(f"answer_recall@{kk}", preds)
        if any("title_recall@1" in p for p in preds):
            summary["title_recall@1"], summary["title_recall@5"] = _mean("title_recall@1", preds), _mean("title_recall@5", preds)
    if mode != "closed":
        summary["context_has_answer"] = _mean("context_has_answer", preds)
    lat = [p["latency_s"] for p in preds]
    summary["latency_p50_s"] = round(percentile(lat, 50), 4)
    summary["latency_p95_s"] = round(percentile(lat, 95), 4)
    for field, name in (("source", "by_source"), ("qtype", "by_type")):
        groups = sorted({p[field] for p in preds if p[field]})
        if len(groups) > 1:  # e.g. built-in descriptions and SQuAD spans, or names and years, score very differently
            summary[name] = {}
            for g in groups:
                rows = [p for p in preds if p[field] == g]
                summary[name][g] = {"n": len(rows), "em": _mean("em", rows), "f1": _mean("f1", rows),
                                    **({"answer_recall@5": _mean("answer_recall@5", rows),
                                        "top5_accuracy": _mean("top5_accuracy", rows)} if mode == "rag" else {})}
    return summary


def answer_sentence(answer: str, sentences: Sequence[str]) -> str | None:
    """The context sentence the answer was most likely read from: the first that holds it, else the one
    sharing most of its words; None for an empty answer or context.

    >>> answer_sentence("Jane Austen", ["It was published in 1813.", "It is a novel by Jane Austen."])
    'It is a novel by Jane Austen.'
    """
    norm = normalize_answer(answer)
    if not norm or not sentences:
        return None
    normed = [normalize_answer(s) for s in sentences]
    for s, n in zip(sentences, normed):
        if f" {norm} " in f" {n} ":
            return s
    words = set(norm.split())
    shared = [len(words & set(n.split())) for n in normed]
    best = max(range(len(sentences)), key=shared.__getitem__)
    return sentences[best] if shared[best] else None


def _retrieved(rag, items: Sequence[dict], k: int, batch_size: int = 64) -> list[list[dict]]:
    """The top-k passages of each item's question by the pipeline's retrieval mode."""
    with autocast(rag.cfg.precision, rag.device):  # queries embedded as answering and training embed them
        _, _, ids = retrieve(rag.retriever, rag.pindex, [it["question"] for it in items], k, batch_size)
    return [[rag.pindex.passages[j] for j in row if j >= 0] for row in ids]


def top_accuracies(rag, items: Sequence[dict], batch_size: int = 64) -> list[dict[str, float]]:
    """{top{k}_accuracy: 0/1} per item for k in TOP_KS (DPR's has_answer), from one search of max(TOP_KS)."""
    ranks = [answer_rank(it["answers"], [p["text"] for p in ps])
             for it, ps in zip(items, _retrieved(rag, items, max(TOP_KS), batch_size))]
    return [{f"top{k}_accuracy": float(r is not None and r <= k) for k in TOP_KS} for r in ranks]


def recall_at_ks(rag, items: Sequence[dict], ks: Sequence[int], batch_size: int = 64) -> dict:
    """Retrieval curves for every k in `ks`, from one search, by the pipeline's retrieval mode:

    top_accuracy     DPR's top-k accuracy (`metrics.has_answer`); also top{1,5,20,100}_accuracy as numbers
    evidence_recall  training's val_recall (`metrics.evidence_recall_at_k`)
    answer_recall    CoZyRAG's SQuAD-normalised answer-in-passage test (`metrics.answer_in_text`)
    title_recall     a passage from the item's article (items with titles)
    and retrieval (the mode), passages (the corpus size), n, k.
    """
    kmax = max(*ks, *TOP_KS)
    ans, tit, evi, acc = ({k: 0.0 for k in {*ks, *TOP_KS}} for _ in range(4))
    n_titled = sum(1 for it in items if it.get("title"))
    for it, ps in zip(items, _retrieved(rag, items, kmax, batch_size)):
        texts, titles = [p["text"] for p in ps], [_title(p["title"]) for p in ps]
        rank = answer_rank(it["answers"], texts)  # DPR's has_answer, first hit
        for k in acc:
            acc[k] += rank is not None and rank <= k
        for k in ks:
            evi[k] += evidence_recall_at_k(it, ps, k)
            ans[k] += answer_recall_at_k(it["answers"], texts, k)
            if it.get("title"):
                tit[k] += title_recall_at_k(_title(it["title"]), titles, k)
    n = len(items)
    out = {"k": list(ks), "n": n, "retrieval": rag.pindex.retrieval, "passages": len(rag.pindex),
           "top_accuracy": [acc[k] / n for k in ks], "evidence_recall": [evi[k] / n for k in ks],
           "answer_recall": [ans[k] / n for k in ks], **{f"top{k}_accuracy": acc[k] / n for k in TOP_KS}}
    if n_titled:
        out["title_recall"] = [tit[k] / n_titled for k in ks]
    return out


def write_results(summary: dict, preds: list[dict], out: str | Path) -> Path:
    """Write the summary JSON and its predictions JSONL beside it (atomically); returns the predictions path."""
    out = Path(out)
    pred_path = out.with_name(out.stem + ".predictions.jsonl")
    write_jsonl(pred_path, preds)
    write_json(out, summary)
    return pred_path


def cli(argv: list[str]) -> int:
    """`python -m cozyrag_lib evaluate [--run=RUN] --qa=FILE [options] [--key=value ...]`; the options are in
    `cozyrag_lib/cli.py`, `--help` lists them."""
    parsed = parse_command("evaluate", argv)
    opts = parsed.options
    if opts["limit"] < 0:
        raise CozyError(f"evaluate: --limit must not be negative, got {opts['limit']}")
    fmt = opts["format"]
    if "qa_format" in parsed.overrides:  # the config key prepare-qa takes names the format here too
        if "format" in parsed.given and parsed.overrides["qa_format"] != fmt:
            raise CozyError(f"evaluate: --format={fmt} and --qa_format={parsed.overrides['qa_format']} disagree; give one")
        fmt = parsed.config().qa_format  # checked like any config value
    run_dir, base, load_kw = locate_run(parsed)  # every value checked before the models load
    if table_kind(opts["qa"]):  # a Parquet/Arrow/CSV file or hf:NAME, columns mapped by --qa_columns
        items, _ = load_qa_table(opts["qa"], parsed.config().qa_columns)
    else:
        items, _ = load_qa_file(opts["qa"], fmt)
    items = items[:opts["limit"]] if opts["limit"] else items
    rag = RAG.load(run_spec(run_dir, base), corpus=opts["corpus"], **load_kw)
    summary, preds = evaluate(rag, items, opts["mode"], batch_size=rag.cfg.eval_batch_size)
    how = opts["mode"] + (f"-{rag.cfg.retrieval}" if opts["mode"] == "rag" and rag.cfg.retrieval != "dense" else "")
    name = re.sub(r"[^\w.-]+", "-", Path(opts["qa"]).stem)  # hf:org/name::split -> name-split
    out = Path(opts["out"]) if opts["out"] else run_dir / "eval" / f"{'base-' if base else ''}{how}-{name}.json"
    write_results(summary, preds, out)
    print(json.dumps(summary))
    return 0
