"""Stage 4: fine-tune the generator and the retriever in alternating phases.

One script, run either way (DDP is detected from the environment):
    python -m cozyrag_lib.train --preset=tiny [--key=value ...] [--resume]          # one process, CPU or one GPU
    torchrun --nproc_per_node=4 -m cozyrag_lib.train --preset=hpc [--resume]        # one process per GPU
    srun torchrun --nnodes=$SLURM_NNODES ... -m cozyrag_lib.train --preset=hpc     # see sbatch/cozyrag.sbatch

Phases (`cfg.phases * cfg.phase_repeats`):
  * generator - retrieve top_k passages for the phase's training questions, keep their best sentences as
    contexts (`build_contexts`), train the causal LM on prompt -> answer + EOS with `GeneratorLoss`
    (answer NLL + n-gram repeat, keyword overlap and short-answer penalties), LM-head logits computed only
    at answer positions;
  * retriever - `lm_supervised` (default): the retriever's softmax over its top `retriever_candidates`
    passages is pulled toward how likely each passage makes the generator say the gold answer (KL), plus
    InfoNCE toward the gold passage when the item knows it; `contrastive`: in-batch InfoNCE on
    (question, the context it retrieved). Afterwards the corpus is re-embedded and the FAISS index
    rebuilt (`refresh_index`; not with `query_only`, which freezes the passage side).

Artefacts under cfg.run_dir:
    metrics.jsonl        one JSON object per optimizer step and per evaluation (rank 0 appends, flushes)
    val_answers.jsonl    answers to cfg.val_questions after each generator phase
    checkpoints/last/    everything `--resume` needs, written atomically
    final/{generator,retriever,index}/   the trained models and the refreshed index (plain HF / ST / FAISS formats)
    train.config.json    the resolved config

Evaluation (step 0, every `eval_every` steps, each phase end) on `max_val_qa` validation questions:
    val_loss             the generator's answer NLL (mean per answer token, EOS included) given the
                         contexts the current retriever and index build (no penalties)
    val_recall@5         share of questions with their gold evidence in a top-5 passage: a passage that
                         holds a gold answer for extractive items (the answer occurs in the item's own
                         context, as in SQuAD), a passage from the item's article for the others (the
                         built-in QA's answers are article descriptions that rarely occur verbatim)
    val_recall@1         the same with the top passage only
    val_answer_recall@5  share with a gold answer in a top-5 passage (SQuAD normalisation: lower-case,
                         no punctuation, no articles, single spaces), whatever the item's kind
    val_title_recall@5   among questions that name their article (`title`), share with a top-5 passage
                         from that article
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, DistributedSampler
from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from . import distributed
from .atomic import atomic_dir, atomic_path, atomic_write_text
from .config import Config, load_config, parse_cli_overrides
from .errors import CozyError, first_line, run_guarded
from .models import autocast
from .paths import FINAL
from .retrieval import (CHAT, SentenceCache, build_contexts, collate, encode_example, format_prompt, gold_passages,
                        retrieve, to_device, truncate_tokens)

CHECKPOINT = "checkpoints/last"


# ----------------------------------------------------------------------------------------------
# models: logits only where the answer is predicted


def base_model_of(lm: nn.Module) -> nn.Module:
    """The transformer under a causal LM's head (GPT-2: .transformer, Llama: .model), found generically."""
    base = getattr(lm, "base_model", None)
    if base is not None and base is not lm:
        return base
    get = getattr(lm, "get_decoder", None)
    if get is not None and get() is not None:
        return get()
    raise CozyError(f"generator {type(lm).__name__}: cannot find its base model (no base_model or get_decoder)")


class AnswerLM(nn.Module):
    """A causal LM that returns LM-head logits only at the positions that predict answer tokens.

    The full (B, T, V) logits of a 49k-token vocabulary are the largest tensor of a step; the answer
    is a few tokens of a prompt of a hundred or more, so the head runs on (B, L, H) gathered states.
    Wrapping the whole computation in one module lets DDP see one forward per backward.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = base_model_of(self.lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out[0]  # (B, T, H) final hidden states (after the last norm)
        gathered = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))  # (B, L, H)
        return self.lm.get_output_embeddings()(gathered)  # (B, L, V)


class RetrieverEncoder(nn.Module):
    """Unit embeddings for several feature batches in ONE forward (so DDP sees one forward per backward)."""

    def __init__(self, st):
        super().__init__()
        self.st = st

    def forward(self, *features):
        return tuple(None if f is None else F.normalize(self.st(f)["sentence_embedding"].float(), dim=-1)
                     for f in features)


def encode_features(retriever, texts: list[str], device) -> dict:
    """Tokenised retriever inputs on `device` (sentence-transformers >= 6: preprocess, before: tokenize)."""
    from sentence_transformers.util import batch_to_device

    st = getattr(retriever, "module", retriever)
    prep = getattr(st, "preprocess", None) or st.tokenize
    return batch_to_device(prep(texts), device)


@torch.no_grad()
def answer_logprobs(lm, batch: dict) -> torch.Tensor:
    """(B,) the generator's mean per-token log-prob of each row's answer (+ EOS), no grad, eval mode."""
    was = lm.training
    lm.eval()
    try:
        logits = AnswerLM(lm)(batch["input_ids"], batch["attention_mask"], batch["positions"]).float()  # (B, L, V)
    finally:
        lm.train(was)
    logp = logits.log_softmax(-1).gather(-1, batch["answer_ids"].unsqueeze(-1)).squeeze(-1)  # (B, L)
    mask = batch["answer_mask"].float()
    return (logp * mask).sum(1) / mask.sum(1).clamp(min=1)


# ----------------------------------------------------------------------------------------------
# data: training QA, phases, length-bucketed batches


def load_train_items(cfg: Config) -> list[dict]:
    """Training QA (qa/train.jsonl + the train split of cfg.qa_extra files), capped at cfg.max_train_qa."""
    from .qa import load_qa_file, read_qa, seeded_sample, split_key, split_of

    items = read_qa(cfg.run_dir / "qa" / "train.jsonl")
    for path in cfg.qa_extra:  # the same split rule as prepare-qa, so no validation article leaks in
        extra, _ = load_qa_file(path, "auto")
        items += [it for it in extra if split_of(split_key(it)) == "train"]
    if cfg.max_train_descriptions:  # fewer description questions, every factoid and file item kept
        desc = [i for i, it in enumerate(items) if it.get("qtype") == "description"]
        keep = set(seeded_sample(desc, cfg.max_train_descriptions, cfg.seed))
        items = [it for i, it in enumerate(items) if it.get("qtype") != "description" or i in keep]
    items = seeded_sample(items, cfg.max_train_qa, cfg.seed)
    if not items:
        raise CozyError(f"{cfg.run_dir / 'qa' / 'train.jsonl'}: no training QA pairs; check qa_sources and rerun prepare-qa")
    return items


def plan_phases(cfg: Config, n_items: int, world: int) -> list[tuple[str, int]]:
    """[(kind, optimizer steps)] for every phase: epochs_per_phase passes, capped at max_steps_per_phase."""
    per_epoch = n_items // (cfg.batch_size * world)  # global micro-batches per epoch (a partial one is dropped)
    if per_epoch == 0:
        raise CozyError(f"{n_items} training QA pairs are fewer than one global batch ({cfg.batch_size} x {world} "
                        "processes); lower batch_size or add QA")
    steps = max(1, int(cfg.epochs_per_phase * per_epoch) // cfg.grad_accum)

    def cap(kind: str) -> int:
        limit = (cfg.retriever_max_steps_per_phase if kind == "retriever" else 0) or cfg.max_steps_per_phase
        return min(steps, limit) if limit else steps

    return [(kind, cap(kind)) for kind in cfg.phases * cfg.phase_repeats]


class PhaseBatches(Dataset):
    """Pre-formed, length-bucketed batches of one phase; item i is one rank's slice of a global batch.

    Each epoch the items are shuffled (seeded by seed, phase, epoch), sorted by length inside windows
    of 32 global batches (little padding), cut into global batches of batch_size * world and the
    global batches shuffled. Item j * world + r is rank r's share of global batch j, so the
    DistributedSampler (shuffle=False) hands every rank its slice of the same global batch: a step
    sees the same questions with 1 process x batch 4 as with 2 processes x batch 2.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, world: int, seed: int, phase_index: int):
        self.lengths, self.batch_size, self.world = np.asarray(lengths), batch_size, world
        self.seed, self.phase_index = seed, phase_index
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, self.phase_index, epoch])
        g = self.batch_size * self.world
        order = rng.permutation(len(self.lengths))[: len(self.lengths) // g * g]
        window = 32 * g
        for s in range(0, len(order), window):  # similar lengths together, but only locally
            w = order[s:s + window]
            order[s:s + window] = w[np.argsort(-self.lengths[w], kind="stable")]
        batches = order.reshape(-1, g)
        self.global_batches = batches[rng.permutation(len(batches))].tolist()

    def __len__(self) -> int:
        return len(self.global_batches) * self.world

    def __getitem__(self, i: int) -> list[int]:
        j, r = divmod(i, self.world)
        return self.global_batches[j][r * self.batch_size:(r + 1) * self.batch_size]

    def items_used(self, n_micro: int) -> list[int]:
        """Item indices the first n_micro global batches of the phase touch (all ranks), sorted."""
        used: set[int] = set()
        epoch, left = 0, n_micro
        while left > 0:
            self.set_epoch(epoch)
            for gb in self.global_batches[:left]:
                used.update(gb)
            left -= len(self.global_batches)
            epoch += 1
        self.set_epoch(0)
        return sorted(used)


def micro_batches(batches: PhaseBatches, sampler: DistributedSampler, epoch: int, skip: int):
    """Endless (epoch, position, item indices) of this rank, from `epoch`, skipping `skip` consumed batches."""
    while True:
        batches.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for pos, i in enumerate(sampler):
            if pos >= skip:
                yield epoch, pos, batches[i]
        epoch, skip = epoch + 1, 0


def get_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warmup for `warmup` steps, then cosine decay to 10% of base_lr at `total`.

    >>> [round(get_lr(s, 10, 1.0, 2), 3) for s in (0, 1, 2, 10)]
    [0.333, 0.667, 1.0, 0.1]
    """
    if step < warmup:
        return base_lr * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 * base_lr + 0.5 * (1 + math.cos(math.pi * progress)) * 0.9 * base_lr


# ----------------------------------------------------------------------------------------------
# the run's state


@dataclass
class Run:
    """Everything one training run holds: config, models, optimizers, data, index, caches, position."""

    cfg: Config
    device: torch.device
    generator: Any  # the causal LM (unwrapped)
    tokenizer: Any
    retriever: Any  # SentenceTransformer being trained (question side, and passage side unless query_only)
    passage_encoder: Any  # = retriever, or a frozen copy of the initial one with query_only
    gen_model: nn.Module  # AnswerLM(generator), DDP-wrapped when distributed
    ret_model: nn.Module  # RetrieverEncoder(retriever), DDP-wrapped when distributed
    opt_generator: torch.optim.Optimizer
    opt_retriever: torch.optim.Optimizer
    loss_fn: nn.Module
    pindex: Any  # PassageIndex (index, passages, manifest, embeddings)
    items: list[dict]  # training QA
    gold: list[int]  # gold passage row per training item (-1 unknown)
    val_items: list[dict]
    plan: list[tuple[str, int]]
    state: dict = field(default_factory=dict)  # position, versions, counters: saved in checkpoints
    phase_data: dict | None = None  # contexts / candidates of the current phase's questions
    sentence_cache: SentenceCache | None = None
    context_cache: dict = field(default_factory=dict)  # (retriever version, index version, n sentences) -> {id: context}
    val_cache: dict = field(default_factory=dict)  # (retriever version, index version) -> retrieval results
    log: Any = None  # MetricsLog

    @property
    def versions(self) -> tuple[int, int]:
        """(retriever version, index version): what retrieval results depend on.

        The retriever version is its number of optimizer updates (so an evaluation in the middle of a
        retriever phase retrieves afresh); the index version counts refreshes (manifest `version`).
        """
        return self.state["ret_step"], self.state["index_version"]

    def autocast(self):
        return autocast(self.cfg.precision, self.device)


def adamw(model: nn.Module, lr: float, weight_decay: float, device: torch.device, fused: bool = True):
    """AdamW; fused: one kernel updates every parameter (CPU and CUDA) instead of several ops per tensor."""
    fused = fused and device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def new_state(run_index_version: int) -> dict:
    return {"phase_index": 0, "phase_step": 0, "epoch": 0, "pos": 0, "step": 0, "gen_step": 0, "ret_step": 0,
            "index_version": run_index_version, "initial_index_version": run_index_version,
            "metrics_lines": 0, "answers_lines": 0}


# ----------------------------------------------------------------------------------------------
# retrieval for a phase: contexts (generator), candidates (retriever)


def sharded(fn, n: int) -> dict:
    """Run fn(range) on this rank's share of range(n); every rank gets the merged {key: value} dict."""
    merged: dict = {}
    for part in distributed.all_gather_object(fn(distributed.shard(n))):
        merged.update(part)
    return merged


def sentence_cache(run: Run) -> SentenceCache:
    """The per-passage sentence embeddings, emptied when the passage side changed (a new retriever version)."""
    if run.sentence_cache.version != run.versions[0] and not run.cfg.query_only:
        run.sentence_cache.reset(run.versions[0])
    return run.sentence_cache


def contexts_for(run: Run, items: list[dict], max_sentences: int) -> dict[str, str]:
    """{item id: context}: cached for the current (retriever, index) versions; only missing ones are built."""
    cfg = run.cfg
    run.context_cache = {k: v for k, v in run.context_cache.items() if k[:2] == run.versions}  # drop stale ones
    cache = run.context_cache.setdefault((*run.versions, max_sentences), {})
    todo = [it for it in items if it["id"] not in cache]
    if todo:
        def work(share: range) -> dict:
            mine, out = todo[share.start:share.stop], {}
            chunk = 4 * cfg.embed_batch_size  # questions per round: retrieve, then encode their new sentences
            for s in tqdm(range(0, len(mine), chunk), desc="contexts", unit="chunk", leave=False,
                          disable=not distributed.is_main_process() or len(mine) <= chunk):
                part = mine[s:s + chunk]
                with run.autocast():
                    q_emb, _, ids = retrieve(run.retriever, run.pindex, [it["question"] for it in part], cfg.top_k,
                                             cfg.embed_batch_size)
                    ctx = build_contexts(q_emb, ids, run.pindex.passages, sentence_cache(run), run.tokenizer,
                                         max_sentences, cfg.context_tokens)
                out.update({it["id"]: c for it, c in zip(part, ctx)})
            return out

        cache.update(sharded(work, len(todo)))
    return {it["id"]: cache[it["id"]] for it in items}


def prepare_phase(run: Run, kind: str, item_rows: list[int]) -> dict:
    """Retrieval results for the questions a phase will use, on every rank: {"contexts"} or {"candidates"}."""
    cfg, items = run.cfg, [run.items[i] for i in item_rows]
    data: dict = {"phase_index": run.state["phase_index"], "kind": kind}
    if kind == "generator" or cfg.retriever_loss == "contrastive":
        data["contexts"] = contexts_for(run, items, cfg.train_max_sentences)
    if kind == "retriever" and cfg.retriever_loss == "lm_supervised":
        def work(share: range) -> dict:
            mine = items[share.start:share.stop]
            with run.autocast():
                _, _, ids = retrieve(run.retriever, run.pindex, [it["question"] for it in mine],
                                     cfg.retriever_candidates, cfg.embed_batch_size, show_progress=True)
            return {it["id"]: row.tolist() for it, row in zip(mine, ids)}

        data["candidates"] = sharded(work, len(items))
    return data


# ----------------------------------------------------------------------------------------------
# one step


def get_batch(run: Run, kind: str, rows: list[int]) -> dict:
    """The micro-batch for item rows: padded generator tensors, or questions + candidates for the retriever."""
    cfg, tok = run.cfg, run.tokenizer
    items = [run.items[i] for i in rows]
    if kind == "generator":
        examples = [encode_example(tok, it["question"], run.phase_data["contexts"][it["id"]], it["answers"][0],
                                   cfg.prompt_template, cfg.max_length) for it in items]
        return to_device(collate(examples, tok.pad_token_id, tok.eos_token_id), run.device)
    batch = {"questions": [it["question"] for it in items], "answers": [it["answers"][0] for it in items],
             "gold": [run.gold[i] for i in rows]}
    if cfg.retriever_loss == "contrastive":
        batch["contexts"] = [run.phase_data["contexts"][it["id"]] for it in items]
    else:
        batch["candidates"] = [run.phase_data["candidates"][it["id"]] for it in items]
    return batch


def generator_loss(run: Run, batch: dict) -> tuple[torch.Tensor, dict]:
    with run.autocast():
        logits = run.gen_model(batch["input_ids"], batch["attention_mask"], batch["positions"])  # (B, L, V)
    total, parts = run.loss_fn(logits.float(), batch)
    return total, {"loss": total.detach(), **parts}


def passage_text(p: dict) -> str:
    """What the retriever embeds for a passage (title-led, as in the index)."""
    from .index import passage_texts

    return passage_texts([p])[0]


def encode_for_loss(run: Run, questions: list[str], *passage_lists: list[str] | None) -> tuple:
    """Question and passage embeddings with grad; with query_only the passage side is the frozen copy."""
    dev = run.device
    feats = [encode_features(run.retriever, questions, dev)]
    if run.cfg.query_only:
        with torch.no_grad(), run.autocast():
            frozen = [None if t is None else F.normalize(
                run.passage_encoder(encode_features(run.passage_encoder, t, dev))["sentence_embedding"].float(), dim=-1)
                for t in passage_lists]
        with run.autocast():
            (q,) = run.ret_model(*feats)
        return (q, *frozen)
    feats += [None if t is None else encode_features(run.retriever, t, dev) for t in passage_lists]
    with run.autocast():
        return run.ret_model(*feats)


def candidate_logprobs(run: Run, questions: list[str], answers: list[str], cand: torch.Tensor) -> torch.Tensor:
    """(B, C) the generator's mean per-token log-prob of the gold answer with each candidate passage as context.

    No grad, eval mode, `batch_size` prompts per forward; missing candidates (-1) get -1e4.
    """
    cfg, tok, passages = run.cfg, run.tokenizer, run.pindex.passages
    examples = [encode_example(tok, q, truncate_tokens(tok, passage_text(passages[j]), cfg.context_tokens), a,
                               cfg.prompt_template, cfg.max_length)
                for q, a, row in zip(questions, answers, cand.tolist()) for j in row if j >= 0]
    flat = []
    for s in range(0, len(examples), cfg.batch_size):
        batch = to_device(collate(examples[s:s + cfg.batch_size], tok.pad_token_id, tok.eos_token_id), run.device)
        with run.autocast():
            flat.append(answer_logprobs(run.generator, batch).float().cpu())
    logprob = torch.full(cand.shape, -1e4)
    logprob[cand >= 0] = torch.cat(flat) if flat else torch.zeros(0)
    return logprob


def retriever_loss(run: Run, batch: dict) -> tuple[torch.Tensor, dict]:
    """contrastive: InfoNCE on (question, its retrieved context); lm_supervised: KL to the generator's target."""
    from .losses import contrastive_retriever_loss, gold_passage_loss, lm_supervised_retriever_loss

    cfg, passages = run.cfg, run.pindex.passages
    if cfg.retriever_loss == "contrastive":
        q, p = encode_for_loss(run, batch["questions"], batch["contexts"])
        loss = contrastive_retriever_loss(q, p, cfg.retriever_temperature)
        return loss, {"loss": loss.detach(), "retriever_loss": loss.detach()}
    cand = torch.tensor(batch["candidates"])  # (B, C) passage rows, -1 = none found
    B, C = cand.shape
    valid = cand >= 0
    logprob = candidate_logprobs(run, batch["questions"], batch["answers"], cand)  # (B, C) target, no grad
    # scores: the retriever re-encodes questions and candidates WITH grad
    gold = torch.tensor(batch["gold"])  # (B,)
    has_gold = gold >= 0
    q, p, g = encode_for_loss(run, batch["questions"], [passage_text(passages[j]) for j in cand[valid].tolist()],
                              [passage_text(passages[j]) for j in gold[has_gold].tolist()] or None)
    p_full = q.new_zeros(B, C, q.shape[-1])
    p_full[valid.to(q.device)] = p  # (B, C, d)
    scores = torch.einsum("bd,bcd->bc", q, p_full)  # (B, C) cosine
    kl = lm_supervised_retriever_loss(scores, logprob.to(q.device), cfg.retriever_temperature, cfg.target_temperature,
                                      valid.to(q.device))
    parts = {"retriever_kl": kl.detach(), "gold_passage": torch.zeros(())}  # same keys on every rank
    loss = kl
    if g is not None:  # InfoNCE toward the known gold passage, retrieved non-gold passages as hard negatives
        h = has_gold.to(q.device)
        neg_mask = (valid & (cand != gold[:, None])).to(q.device)[h]
        gp = gold_passage_loss(q[h], g, p_full[h], cfg.retriever_temperature, negatives_mask=neg_mask)
        parts["gold_passage"] = gp.detach()
        loss = loss + gp
    return loss, {"loss": loss.detach(), "retriever_loss": loss.detach(), **parts}


# ----------------------------------------------------------------------------------------------
# evaluation, answers, index refresh


@torch.no_grad()
def estimate_loss(run: Run) -> dict:
    """val_loss and recall@5 on the validation questions (sharded over ranks; see the module docstring)."""
    from .metrics import answer_in_text, answer_recall_at_k, evidence_recall_at_k, is_extractive, title_recall_at_k

    cfg, items, passages = run.cfg, run.val_items, run.pindex.passages
    if not items:
        return {}
    key = run.versions
    if key not in run.val_cache:  # retrieval depends only on the retriever and the index: cached per version
        def work(share: range) -> dict:
            mine = items[share.start:share.stop]
            with run.autocast():
                _, _, ids = retrieve(run.retriever, run.pindex, [it["question"] for it in mine], max(5, cfg.top_k),
                                     cfg.embed_batch_size)
            out = {}
            for it, row in zip(mine, ids):
                top = [passages[j] for j in row[:5] if j >= 0]
                texts, titles = [p["text"] for p in top], [p["title"] for p in top]
                out[it["id"]] = (evidence_recall_at_k(it, top, 5), evidence_recall_at_k(it, top, 1),
                                 answer_recall_at_k(it["answers"], texts, 5),
                                 title_recall_at_k(it["title"], titles, 5) if it.get("title") else None)
            return out

        run.val_cache = {key: sharded(work, len(items))}
    hits = run.val_cache[key]
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
        was = run.generator.training
        run.generator.eval()
        with run.autocast():
            logits = AnswerLM(run.generator)(batch["input_ids"], batch["attention_mask"], batch["positions"])
        run.generator.train(was)
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
            "val_context_has_answer": sum(in_context) / len(in_context) if in_context else None}


def answer_val_questions(run: Run) -> list[dict]:
    """Rank 0 answers cfg.val_questions with retrieval; rows for val_answers.jsonl."""
    from .generate import generate_answers

    cfg = run.cfg
    if not cfg.val_questions or not distributed.is_main_process():
        return []
    with run.autocast():
        q_emb, _, ids = retrieve(run.retriever, run.pindex, cfg.val_questions, cfg.top_k, cfg.embed_batch_size)
        contexts = build_contexts(q_emb, ids, run.pindex.passages, sentence_cache(run), run.tokenizer,
                                  cfg.answer_max_sentences, cfg.context_tokens)
        prompts = [format_prompt(run.tokenizer, q, c, cfg.prompt_template) for q, c in zip(cfg.val_questions, contexts)]
        answers = generate_answers(run.generator, run.tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size,
                                   cfg.do_sample, cfg.temperature, cfg.sample_top_k, cfg.top_p,
                                   add_special_tokens=cfg.prompt_template != CHAT)
    st = run.state
    return [{"phase": run.plan[st["phase_index"]][0], "phase_index": st["phase_index"], "step": st["step"],
             "question": q, "answer": a, "context": c} for q, a, c in zip(cfg.val_questions, answers, contexts)]


def refresh_index(run: Run) -> None:
    """Re-embed the corpus with the new retriever (each rank its share) and rebuild the FAISS index."""
    from .index import embed_corpus, make_faiss_index, passage_texts

    cfg = run.cfg
    with run.autocast():
        emb = embed_corpus(run.retriever, passage_texts(run.pindex.passages), cfg.embed_batch_size)  # (N, d) all ranks
    run.pindex.index = make_faiss_index(emb, cfg.index_factory, cfg.nprobe, cfg.ef_search)
    run.pindex.embeddings = emb
    run.state["index_version"] += 1


# ----------------------------------------------------------------------------------------------
# metrics


class MetricsLog:
    """Rows appended to a JSONL file (rank 0, flushed each row), mirrored to MLflow when asked and installed."""

    def __init__(self, path: Path, cfg: Config, keep_lines: int | None = None):
        self.path, self.mlflow, self.lines = path, None, 0
        if not distributed.is_main_process():
            return
        self.lines = truncate_jsonl(path, keep_lines)
        self.file = open(path, "a", encoding="utf-8")
        if cfg.mlflow:
            try:
                import mlflow
            except ImportError:
                print("warning: mlflow=true but MLflow is not installed (pip install mlflow); logging to "
                      f"{path} only", file=sys.stderr)
            else:
                mlflow.set_tracking_uri(cfg.mlflow_uri)
                mlflow.set_experiment("cozyrag")
                mlflow.start_run(run_name=cfg.run_name)
                mlflow.log_params({k: str(v)[:500] for k, v in cfg.to_dict().items()})
                self.mlflow = mlflow

    def log(self, row: dict) -> None:
        if not distributed.is_main_process():
            return
        row = {**row, "time": round(time.time(), 1)}  # wall clock: elapsed times survive a resume
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.lines += 1
        if self.mlflow:
            self.mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in row.items()
                                     if isinstance(v, (int, float)) and k not in ("step", "time")}, step=row["step"])

    def close(self) -> None:
        if distributed.is_main_process():
            self.file.close()
            if self.mlflow:
                self.mlflow.end_run()


def truncate_jsonl(path: Path, keep_lines: int | None) -> int:
    """Keep the first keep_lines lines (a resumed run drops rows written after its checkpoint); None empties."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
    lines = lines[:keep_lines or 0]
    atomic_write_text(path, "".join(lines))
    return len(lines)


def append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def reduce_mean(parts: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Mean of each scalar over ranks (one all-reduce)."""
    keys = sorted(parts)
    t = torch.tensor([float(parts[k]) for k in keys], dtype=torch.float64)
    if distributed.is_distributed():
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        t = t.cpu() / distributed.get_world_size()
    return dict(zip(keys, t.tolist()))


# ----------------------------------------------------------------------------------------------
# checkpoints


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain types (loadable with torch.load(weights_only=True))."""
    py = random.getstate()
    key, pos, has_gauss, gauss = np.random.get_state()[1:]
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [key.tolist(), int(pos), int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    key, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state(("MT19937", np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def weight_checksums(run: Run) -> list[float]:
    """[generator, retriever] sums of all weights: equal on every rank when DDP keeps the replicas in step."""
    return [float(sum(p.detach().double().sum() for p in m.parameters())) for m in (run.generator, run.retriever)]


def save_checkpoint(run: Run) -> None:
    """Models, optimizers, position, RNG states (every rank's), versions, phase data, config: one folder, atomically."""
    rngs = distributed.all_gather_object(rng_state())
    checksums = distributed.all_gather_object(weight_checksums(run))
    if distributed.is_main_process():
        st = {**run.state, "metrics_lines": run.log.lines, "rng": rngs, "world_size": distributed.get_world_size(),
              "weight_checksums": checksums}
        with atomic_dir(run.cfg.run_dir / CHECKPOINT) as tmp:
            run.generator.save_pretrained(tmp / "generator", safe_serialization=True)
            run.tokenizer.save_pretrained(tmp / "generator")
            run.retriever.save(str(tmp / "retriever"))
            torch.save({"generator": run.opt_generator.state_dict(), "retriever": run.opt_retriever.state_dict()},
                       tmp / "optimizers.pt")
            torch.save(st, tmp / "state.pt")
            if run.state["index_version"] != run.state["initial_index_version"]:  # refreshed: keep its vectors
                np.save(tmp / "embeddings.npy", np.asarray(run.pindex.embeddings, dtype=np.float32))
            (tmp / "phase_data.json").write_text(json.dumps(run.phase_data), encoding="utf-8")
            run.cfg.save(tmp / "config.json")
    distributed.barrier()


def read_checkpoint_file(path: Path, **kw) -> Any:
    """One file of a checkpoint (JSON, or torch.load with weights only); a missing or damaged one is a CozyError."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        return torch.load(path, weights_only=True, **kw)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # cut short, edited, not ours
        reason = first_line(e).split(". ")[0]
        raise CozyError(f"{path}: damaged checkpoint ({reason}); restore it, or delete {path.parent} "
                        "to train from the start") from None


def find_checkpoint(run_dir: Path) -> Path | None:
    """checkpoints/last, or the copy atomic_dir keeps for an instant while swapping a new one in."""
    for p in (run_dir / CHECKPOINT, run_dir / "checkpoints" / ".last.old"):
        if (p / "state.pt").is_file():
            return p
    return None


def save_final(run: Run) -> dict:
    """final/{generator,retriever,index} (index refreshed, manifest version) and train.config.json under run_dir (rank 0).

    The stage-3 index in run_dir/index/ stays as it was: it belongs to the base retriever (zero-shot runs use it).
    """
    from .index import save_index
    from .models import retriever_identity

    cfg, rd = run.cfg, run.cfg.run_dir
    final = rd / FINAL
    if distributed.is_main_process():
        with atomic_dir(final / "generator") as tmp:
            run.generator.save_pretrained(tmp, safe_serialization=True)
            run.tokenizer.save_pretrained(tmp)
        with atomic_dir(final / "retriever") as tmp:
            run.retriever.save(str(tmp))
        manifest = {**run.pindex.manifest, "version": run.state["index_version"],
                    "retriever": retriever_identity(str(final / "retriever")),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if cfg.query_only:
            manifest["passage_encoder"] = run.pindex.manifest.get("passage_encoder", run.pindex.manifest["retriever"])
        run.pindex.manifest = manifest
        save_index(final / "index", run.pindex.index, np.asarray(run.pindex.embeddings, dtype=np.float32), manifest, cfg)
        cfg.save(rd / "train.config.json")
    distributed.barrier()
    return {"generator": str(final / "generator"), "retriever": str(final / "retriever"), "index": str(final / "index"),
            "index_version": run.state["index_version"], "steps": run.state["step"]}


# ----------------------------------------------------------------------------------------------
# set-up


def setup_run(cfg: Config, device: torch.device, resume: bool) -> Run:
    """Load data, models (from the checkpoint when resuming), index and optimizers; wrap models in DDP."""
    import copy

    from .chunking import read_passages  # noqa: F401  (PassageIndex reads passages through it)
    from .index import PassageIndex, embedding_dim, make_faiss_index
    from .losses import GeneratorLoss, stopword_token_ids
    from .models import load_generator, load_retriever
    from .qa import read_qa, seeded_sample

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show progress; "Loading weights" bars would bury them
    rd, world = cfg.run_dir, distributed.get_world_size()
    ckpt = find_checkpoint(rd) if resume else None
    if resume and ckpt is None and distributed.is_main_process():
        print(f"note: --resume but no checkpoint in {rd / CHECKPOINT}; starting from the beginning", file=sys.stderr)
    if ckpt is not None:
        saved = read_checkpoint_file(ckpt / "config.json")
        changed = sorted(k for k, v in cfg.to_dict().items() if saved.get(k) != v and k not in ("debug", "device"))
        if changed and distributed.is_main_process():
            print(f"note: resuming with config values that differ from the checkpoint's: {', '.join(changed)}",
                  file=sys.stderr)

    items = load_train_items(cfg)
    plan = plan_phases(cfg, len(items), world)  # a batch larger than the data fails now, not after loading the models
    val_items = read_qa(rd / "qa" / "validation.jsonl")
    val_items = seeded_sample(val_items, cfg.max_val_qa, cfg.seed)  # every QA source represented
    torch.manual_seed(cfg.seed)  # identical initial weights wherever something is initialised at random

    gen_src = str(ckpt / "generator") if ckpt else cfg.generator
    generator, tokenizer = load_generator(gen_src, cfg.model_cache, cfg.trust_remote_code)
    generator.to(device)
    retriever = load_retriever(str(ckpt / "retriever") if ckpt else cfg.retriever, str(device), cfg.trust_remote_code)
    passage_encoder = retriever
    if cfg.query_only:  # a frozen copy of the initial retriever embeds passages (and sentences)
        passage_encoder = load_retriever(cfg.retriever, str(device), cfg.trust_remote_code) if ckpt else copy.deepcopy(retriever)
        passage_encoder.eval().requires_grad_(False)

    pindex = PassageIndex.load(rd / "index", rd / "passages.jsonl", retriever=None if ckpt else cfg.retriever,
                               expected_dim=embedding_dim(retriever))
    state = new_state(int(pindex.manifest.get("version", 0)))
    if ckpt:
        state.update(read_checkpoint_file(ckpt / "state.pt"))
        if (ckpt / "embeddings.npy").is_file():  # the refreshed index the run had reached
            pindex.embeddings = np.load(ckpt / "embeddings.npy")
            pindex.index = make_faiss_index(pindex.embeddings, cfg.index_factory, cfg.nprobe, cfg.ef_search)
    if pindex.embeddings is None:
        raise CozyError(f"{rd / 'index'}: embeddings.npy missing; rebuild the index (python -m cozyrag_lib index)")

    gen_model, ret_model = AnswerLM(generator), RetrieverEncoder(retriever)
    if distributed.is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        gen_model = nn.parallel.DistributedDataParallel(gen_model, device_ids=ids)
        # the BERT pooler runs but feeds no loss: unused parameters must be tolerated
        ret_model = nn.parallel.DistributedDataParallel(ret_model, device_ids=ids, find_unused_parameters=True)
    opt_g = adamw(generator, cfg.lr_generator, cfg.weight_decay, device)
    opt_r = adamw(retriever, cfg.lr_retriever, cfg.weight_decay, device)
    if ckpt:
        opts = read_checkpoint_file(ckpt / "optimizers.pt", map_location=device)
        opt_g.load_state_dict(opts["generator"])
        opt_r.load_state_dict(opts["retriever"])

    run = Run(cfg=cfg, device=device, generator=generator, tokenizer=tokenizer, retriever=retriever,
              passage_encoder=passage_encoder, gen_model=gen_model, ret_model=ret_model, opt_generator=opt_g,
              opt_retriever=opt_r, loss_fn=GeneratorLoss.from_config(cfg, keyword_ignore_ids=stopword_token_ids(tokenizer)),
              pindex=pindex, items=items, gold=gold_passages(items, pindex.passages), val_items=val_items,
              plan=plan, state=state)
    run.sentence_cache = SentenceCache(passage_encoder, cfg.embed_batch_size, version=state["ret_step"])
    if ckpt:
        data = read_checkpoint_file(ckpt / "phase_data.json")
        run.phase_data = data if data and data.get("phase_index") == state["phase_index"] else None
        rngs = state.pop("rng")
        state.pop("weight_checksums", None)
        if len(rngs) == world:
            set_rng_state(rngs[distributed.get_rank()])
        elif distributed.is_main_process():
            print(f"note: checkpoint from {len(rngs)} processes, resuming on {world}: random streams restart",
                  file=sys.stderr)
    else:
        torch.manual_seed(cfg.seed + distributed.get_rank())  # dropout differs between ranks, as it should
    state.pop("world_size", None)
    if distributed.is_main_process():
        rd.mkdir(parents=True, exist_ok=True)
        cfg.save(rd / "train.config.json")
        truncate_jsonl(rd / "val_answers.jsonl", state["answers_lines"] if ckpt else None)
    run.log = MetricsLog(rd / "metrics.jsonl", cfg, state["metrics_lines"] if ckpt else None)
    return run


# ----------------------------------------------------------------------------------------------
# the loop


def train(cfg: Config, resume: bool = False) -> dict:
    """Run every phase of cfg (continuing from checkpoints/last with resume); returns where the artefacts are."""
    owns_group = distributed.launched_by_torchrun() and not distributed.is_distributed()
    device = distributed.setup(cfg.device)
    try:
        run = setup_run(cfg, device, resume)
        try:
            return train_loop(run)
        finally:
            run.log.close()
    finally:
        if owns_group:
            distributed.cleanup()


def log_eval(run: Run) -> None:
    st = run.state
    row = {"step": st["step"], "phase": run.plan[min(st["phase_index"], len(run.plan) - 1)][0],
           "phase_index": st["phase_index"], **estimate_loss(run),
           "retriever_version": st["ret_step"], "index_version": st["index_version"]}
    run.log.log(row)
    if distributed.is_main_process() and "val_loss" in row:
        tqdm.write(f"step {row['step']}: val_loss {row['val_loss']:.4f}, val_recall@5 {row['val_recall@5']:.3f}")


def train_loop(run: Run) -> dict:
    cfg, st, world = run.cfg, run.state, distributed.get_world_size()
    main = distributed.is_main_process()
    totals = {k: sum(n for kind, n in run.plan if kind == k) for k in ("generator", "retriever")}
    if main:
        print(f"training {len(run.items)} QA pairs on {world} process(es) ({run.device}); phases: "
              + ", ".join(f"{k} x{n} steps" for k, n in run.plan), flush=True)
    if st["step"] == 0 and st["phase_step"] == 0 and st["phase_index"] == 0:
        log_eval(run)  # the step-0 row: where training starts from

    for pi in range(st["phase_index"], len(run.plan)):
        kind, n_steps = run.plan[pi]
        st["phase_index"] = pi
        gen = kind == "generator"
        model = run.gen_model if gen else run.ret_model
        opt, lr0 = (run.opt_generator, cfg.lr_generator) if gen else (run.opt_retriever, cfg.lr_retriever)
        params = [p for g in opt.param_groups for p in g["params"]]
        run.generator.train(gen)
        run.retriever.train(not gen)
        lengths = np.array([len(it["question"]) + len(it["answers"][0]) for it in run.items])
        batches = PhaseBatches(lengths, cfg.batch_size, world, cfg.seed, pi)
        sampler = DistributedSampler(batches, num_replicas=world, rank=distributed.get_rank(), shuffle=False)
        if run.phase_data is None:  # retrieve for the questions this phase will use
            run.phase_data = prepare_phase(run, kind, batches.items_used(n_steps * cfg.grad_accum))
        stream = micro_batches(batches, sampler, st["epoch"], st["pos"])
        bar = tqdm(total=n_steps, initial=st["phase_step"], desc=f"phase {pi + 1}/{len(run.plan)} {kind}",
                   unit="step", disable=not main, dynamic_ncols=True)
        while st["phase_step"] < n_steps:
            t0 = time.time()
            lr = get_lr(st["gen_step" if gen else "ret_step"], totals[kind], lr0, cfg.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            sums, n_tokens, n_samples = {}, 0, 0
            for micro in range(cfg.grad_accum):
                epoch, pos, rows = next(stream)
                batch = get_batch(run, kind, rows)
                last = micro == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last or not distributed.is_distributed() else model.no_sync()
                with sync:
                    loss, parts = (generator_loss if gen else retriever_loss)(run, batch)
                    (loss / cfg.grad_accum).backward()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
                n_tokens += batch["n_tokens"] if gen else 0
                n_samples += len(rows)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            st.update(step=st["step"] + 1, phase_step=st["phase_step"] + 1, epoch=epoch, pos=pos + 1)
            st["gen_step" if gen else "ret_step"] += 1

            dt = time.time() - t0
            rates = {"samples_per_s": n_samples / dt, **({"tokens_per_s": n_tokens / dt} if gen else {})}
            row = reduce_mean({**sums, **rates})
            for k in rates:  # per-rank rates, summed over ranks
                row[k] *= world
            run.log.log({"step": st["step"], "phase": kind, "phase_index": pi, **row,
                         ("lr_generator" if gen else "lr_retriever"): lr})
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.1e}", sps=f"{row['samples_per_s']:.1f}")
            if st["phase_step"] < n_steps:  # the phase end evaluates and saves anyway
                if st["step"] % cfg.eval_every == 0:
                    log_eval(run)
                if st["step"] % cfg.checkpoint_every == 0:
                    save_checkpoint(run)
        bar.close()

        # phase end: refresh the index after a retriever phase, evaluate, answer, checkpoint
        if not gen and not cfg.query_only:
            refresh_index(run)
        log_eval(run)
        if gen:
            rows = answer_val_questions(run)
            if main and rows:
                append_jsonl(cfg.run_dir / "val_answers.jsonl", rows)
                st["answers_lines"] += len(rows)
        st.update(phase_index=pi + 1, phase_step=0, epoch=0, pos=0)
        run.phase_data = None
        save_checkpoint(run)
    return save_final(run)


# ----------------------------------------------------------------------------------------------
# command line, notebook launcher, plots


def cli(argv: list[str]) -> int:
    """`python -m cozyrag_lib train [--preset=NAME] [--key=value ...] [--resume]`."""
    argv = list(argv)
    resume = "--resume" in argv
    preset, overrides = parse_cli_overrides([a for a in argv if a not in ("--resume", "--debug")])
    cfg = load_config(preset or "demo", overrides)
    summary = train(cfg, resume=resume)
    if distributed.is_main_process():
        print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: cli(argv), debug="--debug" in argv)


def config_toml(cfg: Config) -> str:
    """The resolved config as a preset file (TOML); JSON literals are valid TOML values for these types."""
    lines = ["# resolved config written by cozyrag_lib.train.launch"]
    for k, v in cfg.to_dict().items():
        lines.append(f"{k} = {json.dumps(v, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def launch(cfg: Config, nproc_per_node: int = 1, resume: bool = False) -> int:
    """Run training under torchrun in a subprocess, streaming its output live; CozyError when it fails.

    The resolved config goes to `{run_dir}/train.launch.toml` and the command is
    `python -m torch.distributed.run --standalone --nproc_per_node=N -m cozyrag_lib.train --preset=<that file>`.
    """
    import codecs
    import subprocess

    path = cfg.run_dir / "train.launch.toml"
    atomic_write_text(path, config_toml(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc_per_node)}",
           "-m", "cozyrag_lib.train", f"--preset={path}"] + (["--resume"] if resume else [])
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # chunks, not lines: progress bars use \r
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
    except KeyboardInterrupt:
        proc.terminate()
        raise
    rc = proc.wait()
    if rc != 0:
        raise CozyError(f"training exited with status {rc}; its error is printed above")
    return rc


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()] if path.is_file() else []


def plot_metrics(run_dir: str | Path):
    """Loss, penalties, val_loss and recall@5 against step from metrics.jsonl; saved as plots/training.png."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        raise CozyError(f"{run_dir / 'metrics.jsonl'}: no metrics; train first")
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
    for ax, title in zip(axes, ["training loss", "generator penalties (unweighted)", "validation answer NLL",
                                "validation retrieval"]):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    with atomic_path(run_dir / "plots" / "training.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return fig


def val_answers_markdown(run_dir: str | Path, last_only: bool = True) -> str:
    """The validation answers as a markdown table (the last generator phase's, or all)."""
    rows = read_jsonl(Path(run_dir) / "val_answers.jsonl")
    if rows and last_only:
        rows = [r for r in rows if r["step"] == rows[-1]["step"]]
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")[:200]  # noqa: E731
    lines = ["| step | question | answer | context |", "|---:|---|---|---|"]
    lines += [f"| {r['step']} | {cell(r['question'])} | {cell(r['answer'])} | {cell(r['context'])} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
