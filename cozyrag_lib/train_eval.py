"""Evaluation during training, the index refresh after a retriever phase, and the metrics log.

Evaluation (step 0, every `eval_every` steps, each phase end) on `max_val_qa` validation questions:
    val_loss             the generator's answer NLL (mean per answer token, EOS included) given the
                         contexts the current retriever and index build (no penalties)
    val_recall@5         share of questions with their gold evidence in a top-5 passage: a passage that
                         holds a gold answer for extractive items (the answer occurs in the item's own
                         context, as in SQuAD and the built-in QA), a passage from the item's article
                         for the others (descriptions on the bare leads, which rarely occur verbatim)
    val_recall@1         the same with the top passage only
    val_answer_recall@5  share with a gold answer in a top-5 passage (SQuAD normalisation: lower-case,
                         no punctuation, no articles, single spaces), whatever the item's kind
    val_title_recall@5   among questions that name their article (`title`), share with a top-5 passage
                         from that article
    val_context_has_answer  among extractive questions, share whose built context still holds a gold answer
After a retriever phase the row also holds `val_recall@{5,1}_stale` (the new query encoder against the old
passage vectors: what the refresh buys), `refresh` (cfg.refresh: full, retrieved or none), `refresh_s` (the
refresh's seconds) and `refresh_passages` (passages re-embedded: all, the retrieved ones, or 0).
The keys above use the run's `retrieval` mode. When the run has a BM25 index, every mode is also reported
side by side (the retriever phase trains only the dense side; BM25 does not move, hybrid follows dense):
    val_recall@5_{dense,bm25,hybrid}          val_recall@5 by that mode
    val_top{5,20}_accuracy_{dense,bm25,hybrid} DPR top-k accuracy (`metrics.has_answer`) by that mode
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from . import distributed
from .atomic import atomic_write_text
from .config import Config
from .errors import CozyError, first_line
from .generate import generate_answers
from .embedding import embed_corpus, passage_texts
from .index import RETRIEVAL_MODES, make_faiss_index
from .jsonio import truncate_jsonl
from .metrics import (answer_in_text, answer_recall_at_k, evidence_recall_at_k, is_extractive, title_recall_at_k,
                      top_k_accuracy)
from .models import eval_mode
from .retrieval import CHAT, build_contexts, collate, encode_example, format_prompt, gold_passages, retrieve, to_device
from .train_data import contexts_for, sentence_cache, sharded
from .train_state import Run
from .train_steps import AnswerLM

# ----------------------------------------------------------------------------------------------
# validation, answers to cfg.val_questions, index refresh


def val_modes(run: Run) -> tuple[str, ...]:
    """The retrieval modes validation recall is logged for: all of them where the index has BM25, else the run's."""
    return RETRIEVAL_MODES if run.pindex.has_bm25() else (run.pindex.retrieval,)


@torch.no_grad()
def val_retrieval(run: Run) -> dict:
    """{item id: {mode: (recall@5, top-5, top-20 accuracy), "run": (recall@5, recall@1, answer recall@5, title
    recall@5)}} of the validation questions, retrieved by the current retriever and index (cached per version)."""
    cfg, items, passages = run.cfg, run.val_items, run.pindex.passages
    key, modes = run.versions, val_modes(run)
    if key not in run.val_cache:  # retrieval depends only on the retriever and the index: cached per version
        def work(share: range) -> dict:
            mine = items[share.start:share.stop]
            questions = [it["question"] for it in mine]
            out = {it["id"]: {} for it in mine}
            for mode in modes:
                with run.autocast():
                    _, _, ids = retrieve(run.retriever, run.pindex, questions, 20, cfg.embed_batch_size, mode=mode)
                for it, row in zip(mine, ids):
                    top = [passages[j] for j in row if j >= 0]  # (20,)
                    texts, titles = [p["text"] for p in top], [p["title"] for p in top]
                    out[it["id"]][mode] = (evidence_recall_at_k(it, top, 5), top_k_accuracy(it["answers"], texts, 5),
                                           top_k_accuracy(it["answers"], texts, 20))
                    if mode == run.pindex.retrieval:  # the run's own mode: the keys training always logged
                        out[it["id"]]["run"] = (evidence_recall_at_k(it, top, 5), evidence_recall_at_k(it, top, 1),
                                                answer_recall_at_k(it["answers"], texts, 5),
                                                title_recall_at_k(it["title"], titles, 5) if it.get("title") else None)
            return out

        run.val_cache = {key: sharded(work, len(items))}
    return run.val_cache[key]


@torch.no_grad()
def estimate_loss(run: Run) -> dict:
    """val_loss and recall@5 on the validation questions (sharded over ranks; see the module docstring)."""
    cfg, items = run.cfg, run.val_items
    if not items:
        return {}
    modes = val_modes(run)
    by_mode = val_retrieval(run)
    hits = {i: h["run"] for i, h in by_mode.items()}
    contexts = contexts_for(run, items, cfg.train_max_sentences)
    extractive = [it for it in items if is_extractive(it)]
    in_context = [answer_in_text(it["answers"], contexts[it["id"]]) for it in extractive]  # survived the cuts?
    share = distributed.shard(len(items))
    nll, n_tok = 0.0, 0
    tok = run.tokenizer
    for s in range(share.start, share.stop, cfg.batch_size):
        chunk = items[s:min(s + cfg.batch_size, share.stop)]
        batch = to_device(collate([encode_example(tok, it["question"], contexts[it["id"]], it["answers"][0],
                                                  cfg.prompt_template, cfg.max_length) for it in chunk],
                                  tok.pad_token_id, tok.eos_token_id), run.device)
        with eval_mode(run.generator), run.autocast():
            logits = AnswerLM(run.generator)(batch["input_ids"], batch["attention_mask"], batch["positions"])
        m = batch["answer_mask"]
        nll += F.cross_entropy(logits.float()[m], batch["answer_ids"][m], reduction="sum").item()
        n_tok += int(m.sum())
    nll, n_tok = map(sum, zip(*distributed.all_gather_object((nll, n_tok))))
    n = len(hits)
    titled = [h[3] for h in hits.values() if h[3] is not None]
    return {"val_loss": nll / max(1, n_tok),
            "val_recall@5": sum(h[0] for h in hits.values()) / n,
            "val_recall@1": sum(h[1] for h in hits.values()) / n,
            "val_answer_recall@5": sum(h[2] for h in hits.values()) / n,
            "val_title_recall@5": sum(titled) / len(titled) if titled else None,
            "val_context_has_answer": sum(in_context) / len(in_context) if in_context else None,
            **side_by_side(by_mode, modes)}


def side_by_side(by_mode: dict, modes) -> dict:
    """val_recall@5_{mode}, val_top5_accuracy_{mode}, val_top20_accuracy_{mode} for each retrieval mode (when the
    run has a BM25 index; with one mode only the run's own keys are logged)."""
    if len(modes) < 2:
        return {}
    n, out = len(by_mode), {}
    for mode in modes:
        for j, name in enumerate(("val_recall@5", "val_top5_accuracy", "val_top20_accuracy")):
            out[f"{name}_{mode}"] = sum(h[mode][j] for h in by_mode.values()) / n
    return out


def answer_val_questions(run: Run) -> list[dict]:
    """Rank 0 answers cfg.val_questions with retrieval; rows for val_answers.jsonl."""
    cfg = run.cfg
    if not cfg.val_questions or not distributed.is_main_process():
        return []
    run.use_attention(training=False)
    with run.autocast():
        q_emb, _, ids = retrieve(run.retriever, run.pindex, cfg.val_questions, cfg.top_k, cfg.embed_batch_size)
        contexts = build_contexts(q_emb, ids, run.pindex.passages, sentence_cache(run), run.tokenizer,
                                  cfg.answer_max_sentences, cfg.context_tokens, cfg.context_order)
        prompts = [format_prompt(run.tokenizer, q, c, cfg.prompt_template) for q, c in zip(cfg.val_questions, contexts)]
        answers = generate_answers(run.generator, run.tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size,
                                   cfg.do_sample, cfg.temperature, cfg.sample_top_k, cfg.top_p,
                                   add_special_tokens=cfg.prompt_template != CHAT, seed=cfg.seed)
    st = run.state
    return [{"phase": run.phase, "phase_index": st.phase_index, "step": st.step,
             "question": q, "answer": a, "context": c} for q, a, c in zip(cfg.val_questions, answers, contexts)]


def stale_recall(run: Run) -> dict:
    """val_recall@{5,1}_stale: the new query encoder against the passage vectors of before the refresh, i.e.
    what skipping the refresh would cost (call it before `refresh_index`; the eval row after it has the fresh ones)."""
    if not run.val_items:
        return {}
    hits = [h["run"] for h in val_retrieval(run).values()]
    return {"val_recall@5_stale": sum(h[0] for h in hits) / len(hits),
            "val_recall@1_stale": sum(h[1] for h in hits) / len(hits)}


def evidence_recall(items: list[dict], passages: list[dict], ids: np.ndarray) -> dict[str, float]:
    """{"recall@5", "recall@1"}: the share of `items` whose gold evidence (`metrics.evidence_recall_at_k`, as
    val_recall@5 / @1 count it) is among their retrieved rows `ids` (n, >= 5; -1 = nothing found)."""
    if not items:
        return {"recall@5": None, "recall@1": None}
    tops = [[passages[j] for j in row if j >= 0] for row in ids]
    return {f"recall@{k}": sum(evidence_recall_at_k(it, top, k) for it, top in zip(items, tops)) / len(items)
            for k in (5, 1)}


def refresh_targets(cfg: Config, items: list[dict], gold: list[int], val_items: list[dict],
                    passages: list[dict]) -> tuple[list[str], list[int]]:
    """What refresh=retrieved re-embeds for: (questions, known gold rows). The questions are those the run
    retrieves for (training items, validation items, cfg.val_questions); the gold rows are the training items'
    `gold` and the validation items' (`retrieval.gold_passages`), unknown ones (-1) left out."""
    questions = [it["question"] for it in items] + [it["question"] for it in val_items] + list(cfg.val_questions)
    rows = [g for g in list(gold) + gold_passages(val_items, passages) if g >= 0]
    return questions, rows


@torch.no_grad()
def refresh_rows(retriever, pindex, questions: list[str], gold: list[int], top_n: int,
                 batch_size: int = 64) -> np.ndarray:
    """Sorted passage rows refresh=retrieved re-embeds: the union of each question's top-`top_n` passages, found
    by `retriever` (the new query encoder) in `pindex`'s dense index (the stale passage vectors), and `gold`.

    Each rank searches its share of the questions and the rows are gathered, so every rank returns the same array.
    """
    share = distributed.shard(len(questions))
    mine = list(questions[share.start:share.stop])
    found = np.empty(0, np.int64)
    for s in range(0, len(mine), 16 * batch_size):  # in slices: ids of a million questions at once need not exist
        _, _, ids = retrieve(retriever, pindex, mine[s:s + 16 * batch_size], top_n, batch_size, mode="dense")
        found = np.union1d(found, ids[ids >= 0])
    parts = distributed.all_gather_object(found)
    return np.unique(np.concatenate([*parts, np.asarray(gold, np.int64)])).astype(np.int64)


def reembed_rows(retriever, pindex, rows: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """`pindex.embeddings` with `rows` re-embedded by `retriever` (sharded over ranks like `embed_corpus`: every
    rank gets the same matrix); the other rows stay bit for bit. Written in place where the matrix is an
    in-memory float32 array, else into a copy (a memory-mapped stage-3 matrix is read-only)."""
    emb = pindex.embeddings
    if isinstance(emb, np.memmap) or not (isinstance(emb, np.ndarray) and emb.dtype == np.float32
                                          and emb.flags.writeable and emb.flags.c_contiguous):
        emb = np.array(emb, dtype=np.float32)  # (N, d)
    texts = passage_texts([pindex.passages[i] for i in rows])
    if len(rows):
        emb[rows] = embed_corpus(retriever, texts, batch_size)  # (len(rows), d), on every rank
    return emb


def refresh_index(run: Run) -> dict:
    """The index refresh after a retriever phase, by cfg.refresh: `full` re-embeds the corpus with the new
    retriever (each rank its share), `retrieved` only `refresh_rows` (written into the embeddings matrix), both
    then rebuild the FAISS index from the matrix and bump index_version; `none` leaves the index as it is.
    Returns the metrics row's {"refresh", "refresh_s", "refresh_passages" (passages re-embedded)}."""
    cfg, pidx, started = run.cfg, run.pindex, time.time()
    if cfg.refresh == "none":
        return {"refresh": "none", "refresh_s": 0.0, "refresh_passages": 0}
    with run.autocast():
        if cfg.refresh == "retrieved":
            questions, gold = refresh_targets(cfg, run.items, run.gold, run.val_items, pidx.passages)
            rows = refresh_rows(run.retriever, pidx, questions, gold, cfg.refresh_top_n, cfg.embed_batch_size)
            emb, n = reembed_rows(run.retriever, pidx, rows, cfg.embed_batch_size), len(rows)
        else:
            emb = embed_corpus(run.retriever, passage_texts(pidx.passages), cfg.embed_batch_size)  # (N, d) all ranks
            n = len(emb)
    pidx.index = make_faiss_index(emb, cfg.index_factory, cfg.nprobe, cfg.ef_search)
    pidx.embeddings = emb
    run.state.index_version += 1
    return {"refresh": cfg.refresh, "refresh_s": time.time() - started, "refresh_passages": int(n)}


# ----------------------------------------------------------------------------------------------
# the metrics log


def log_eval(run: Run, extra: dict | None = None) -> None:
    """Evaluate and log one row, with `extra` values in it (also printed on rank 0)."""
    st = run.state
    run.use_attention(training=False)
    row = {"step": st.step, "phase": run.phase, "phase_index": st.phase_index, **estimate_loss(run), **(extra or {}),
           "retriever_version": st.ret_step, "index_version": st.index_version}
    run.log.log(row)
    if distributed.is_main_process() and "val_loss" in row:
        tqdm.write(f"step {row['step']}: val_loss {row['val_loss']:.4f}, val_recall@5 {row['val_recall@5']:.3f}")


class MetricsLog:
    """Rows appended to a JSONL file (rank 0, flushed each row), mirrored to MLflow when asked and installed."""

    def __init__(self, path: Path, cfg: Config, keep_lines: int | None = None):
        self.path, self.mlflow, self.lines = path, None, 0
        if not distributed.is_main_process():
            return
        if cfg.mlflow:  # first: a bad tracking URI stops here, before the metrics file is open
            self.mlflow = start_mlflow(cfg, resume=keep_lines is not None)
        self.lines = truncate_jsonl(path, keep_lines)
        self.file = open(path, "a", encoding="utf-8")

    def log(self, row: dict) -> None:
        if not distributed.is_main_process():
            return
        row = {**row, "time": round(time.time(), 1)}  # wall clock: elapsed times survive a resume
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.lines += 1
        if self.mlflow:
            self.mlflow.log_metrics({mlflow_key(k): v for k, v in row.items() if isinstance(v, (int, float))
                                     and not isinstance(v, bool) and k not in ("step", "time")}, step=row["step"])

    def log_artifacts(self, paths, models: bool = False) -> None:
        """At the end of training: the run's small files (metrics, validation answers, config, index manifest,
        plots) and, with `models`, the final generator and retriever folders, as MLflow artefacts."""
        if not (distributed.is_main_process() and self.mlflow):
            return
        for f in (paths.metrics, paths.val_answers, paths.config(paths.train), paths.final_index / "manifest.json"):
            if f.is_file():
                self.mlflow.log_artifact(str(f), artifact_path=f.parent.name)
        if paths.plots.is_dir():
            self.mlflow.log_artifacts(str(paths.plots), artifact_path="plots")
        if models:
            for folder in (paths.final_generator, paths.final_retriever):
                self.mlflow.log_artifacts(str(folder), artifact_path=f"final/{folder.name}")

    def close(self) -> None:
        if distributed.is_main_process():
            self.file.close()
            if self.mlflow:
                self.mlflow.end_run()


def mlflow_key(name: str) -> str:
    """A metric name MLflow accepts (no '@'): val_recall@5 -> val_recall_at_5."""
    return name.replace("@", "_at_")


def start_mlflow(cfg: Config, resume: bool):
    """The mlflow module with this run's MLflow run started, or None (with a warning) where MLflow is missing.

    A new run logs the config as parameters and keeps its MLflow run id in train/mlflow_run_id; a resumed run
    continues that MLflow run. A `sqlite:///DIR/x.db` store keeps its artefacts beside it, in DIR/artifacts.
    """
    try:
        import mlflow  # optional and slow to import: only when asked for
    except ImportError:
        print("warning: mlflow=true but MLflow is not installed (pip install mlflow); logging to "
              f"{cfg.paths.metrics} only", file=sys.stderr)
        return None
    artifacts = None
    if cfg.mlflow_uri.startswith("sqlite:///"):
        db = Path(cfg.mlflow_uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        artifacts = (db.parent / "artifacts").resolve().as_uri()
    id_file = cfg.paths.train / "mlflow_run_id"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    try:
        mlflow.set_tracking_uri(cfg.mlflow_uri)
        if mlflow.get_experiment_by_name(cfg.mlflow_experiment) is None:
            mlflow.create_experiment(cfg.mlflow_experiment, artifact_location=artifacts)
        mlflow.set_experiment(cfg.mlflow_experiment)
        active = mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.run_name)
        if not run_id:
            mlflow.log_params({k: str(v)[:500] for k, v in cfg.to_dict().items()})
    except Exception as e:  # a file-store path recent MLflow refuses, a server that does not answer, ...
        raise CozyError(f"mlflow_uri={cfg.mlflow_uri}: {first_line(e)}") from None
    if not run_id:
        atomic_write_text(id_file, active.info.run_id + "\n")
    return mlflow


def reduce_mean(parts: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Mean of each scalar over ranks: one all-reduce, and one copy to the host (the step's only wait on a GPU).

    >>> reduce_mean({"loss": torch.tensor(0.5), "samples_per_s": 2.0})
    {'loss': 0.5, 'samples_per_s': 2.0}
    """
    keys = sorted(parts)
    on = {v.device for v in parts.values() if isinstance(v, torch.Tensor) and v.device.type != "cpu"}
    dev = next(iter(on), torch.device("cpu"))  # stack on the GPU the losses are on: no copy back per value
    t = torch.stack([torch.as_tensor(parts[k], dtype=torch.float64).detach().to(dev) for k in keys])
    if distributed.is_distributed():
        t = t.cuda() if torch.distributed.get_backend() == "nccl" else t.cpu()
        torch.distributed.all_reduce(t)
        t = t / distributed.get_world_size()
    return dict(zip(keys, t.cpu().tolist()))
