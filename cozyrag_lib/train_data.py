"""What each phase trains on: the training QA, the phase plan, length-bucketed batches, the LR schedule,
and the retrieval a phase needs before its first step (contexts for the generator, candidates for the
retriever), cached per (retriever version, index version) and sharded over ranks.
"""
from __future__ import annotations

import math
import re

import numpy as np
from torch.utils.data import Dataset, DistributedSampler
from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from . import distributed
from .config import Config
from .errors import CozyError
from .qa import load_qa_source, read_qa, seeded_sample, split_key, split_of
from .retrieval import SentenceCache, build_contexts, retrieve
from .train_state import Run

# ----------------------------------------------------------------------------------------------
# training QA, phases, batches, learning rate


def load_train_items(cfg: Config) -> list[dict]:
    """Training QA (qa/train.jsonl + the train split of cfg.qa_extra files), capped at cfg.max_train_qa."""
    items = read_qa(cfg.paths.qa_split("train"))
    for path in cfg.qa_extra:  # the same split rule as prepare-qa, so no validation article leaks in
        extra, _ = load_qa_source(path, cfg)
        items += [it for it in extra if split_of(split_key(it)) == "train"]
    if cfg.max_train_descriptions:  # fewer description questions, every factoid and file item kept
        desc = [i for i, it in enumerate(items) if it.get("qtype") == "description"]
        keep = set(seeded_sample(desc, cfg.max_train_descriptions, cfg.seed))
        items = [it for i, it in enumerate(items) if it.get("qtype") != "description" or i in keep]
    items = seeded_sample(items, cfg.max_train_qa, cfg.seed)
    if cfg.drop_unsupported_years:
        items = [{**it, "answers": [drop_unsupported_years(it["answers"][0], it.get("context", "")), *it["answers"][1:]]}
                 if it.get("qtype") == "description" else it for it in items]
    if not items:
        raise CozyError(f"{cfg.paths.qa_split('train')}: no training QA pairs; check qa_sources and rerun prepare-qa")
    return items


# A trailing "(1879–1955)", "(born 1954)" or "(c. 1000 BC – 1050)": the life years of a short description.
_YEARS = re.compile(r"\s*\(([^()]*\d{3,4}[^()]*)\)\s*$")


def drop_unsupported_years(answer: str, context: str) -> str:
    """The answer without its trailing parenthetical of years when a year in it is missing from `context`.

    Short descriptions carry life years ("English novelist (1775–1817)") that the article's lead often
    lacks; trained on them, the generator learns to write years it was never shown, and invents them.

    >>> drop_unsupported_years("English novelist (1775–1817)", "Jane Austen was an English novelist.")
    'English novelist'
    >>> drop_unsupported_years("English novelist (1775–1817)", "Jane Austen (1775–1817) was an English novelist.")
    'English novelist (1775–1817)'
    >>> drop_unsupported_years("Chemical element with atomic number 17 (Cl)", "")
    'Chemical element with atomic number 17 (Cl)'
    """
    m = _YEARS.search(answer)
    if not m or not answer[:m.start()].strip():  # no years, or nothing but years
        return answer
    supported = all(year in context for year in re.findall(r"\d{3,4}", m.group(1)))
    return answer if supported else answer[:m.start()]


def plan_phases(cfg: Config, n_items: int, world: int) -> list[tuple[str, int]]:
    """[(kind, optimizer steps)] for every phase: epochs_per_phase passes, capped at max_steps_per_phase."""
    per_epoch = n_items // (cfg.batch_size * world * cfg.grad_accum)  # optimizer steps per epoch (a partial one dropped)
    if per_epoch == 0:
        accum = f" x {cfg.grad_accum} micro-batches" if cfg.grad_accum > 1 else ""
        raise CozyError(f"{n_items} training QA pairs are fewer than one global batch ({cfg.batch_size} x {world} "
                        f"processes{accum}); lower batch_size or add QA")
    steps = max(1, int(cfg.epochs_per_phase * per_epoch))

    def cap(kind: str) -> int:
        limit = (cfg.retriever_max_steps_per_phase if kind == "retriever" else 0) or cfg.max_steps_per_phase
        return min(steps, limit) if limit else steps

    return [(kind, cap(kind)) for kind in cfg.phases * cfg.phase_repeats]


def item_lengths(items: list[dict]) -> np.ndarray:
    """What PhaseBatches buckets training items by: the characters of the question and its first answer."""
    return np.array([len(it["question"]) + len(it["answers"][0]) for it in items])


class PhaseBatches(Dataset):
    """Pre-formed, length-bucketed batches of one phase; item i is one rank's slice of a global batch.

    A global batch is what one optimizer step trains on: batch_size * world * accum items. Each epoch the
    items are shuffled (seeded by seed, phase, epoch), sorted by length inside windows of 32 global
    batches (little padding), cut into global batches and the global batches shuffled. Item
    (j * accum + m) * world + r is rank r's share of micro-batch m of global batch j, so the
    DistributedSampler (shuffle=False) hands every rank its slices of the same global batch, one
    micro-batch after the other: a step sees the same questions with 1 process x batch 4 as with
    2 processes x batch 2, or 1 process x batch 2 x 2 micro-batches (grad_accum).
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, world: int, seed: int, phase_index: int,
                 accum: int = 1):
        self.lengths, self.batch_size, self.world, self.accum = np.asarray(lengths), batch_size, world, accum
        self.seed, self.phase_index = seed, phase_index
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, self.phase_index, epoch])
        g = self.batch_size * self.world * self.accum
        order = rng.permutation(len(self.lengths))[: len(self.lengths) // g * g]
        window = 32 * g
        for s in range(0, len(order), window):  # similar lengths together, but only locally
            w = order[s:s + window]
            order[s:s + window] = w[np.argsort(-self.lengths[w], kind="stable")]
        batches = order.reshape(-1, g)
        self.global_batches = batches[rng.permutation(len(batches))].tolist()

    def __len__(self) -> int:
        return len(self.global_batches) * self.world * self.accum

    def __getitem__(self, i: int) -> list[int]:
        j, k = divmod(i, self.world * self.accum)  # k = micro-batch * world + rank
        return self.global_batches[j][k * self.batch_size:(k + 1) * self.batch_size]

    def items_used(self, n_steps: int) -> list[int]:
        """Item indices the first n_steps global batches of the phase touch (all ranks), sorted."""
        used: set[int] = set()
        epoch, left = 0, n_steps
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


def contexts_for(run: Run, items: list[dict], max_sentences: int, mode: str | None = None) -> dict[str, str]:
    """{item id: context} from `mode`'s passages (None: cfg.retrieval): cached for the current (retriever, index)
    versions; only missing ones are built."""
    cfg = run.cfg
    mode = mode or run.pindex.retrieval
    run.context_cache = {k: v for k, v in run.context_cache.items() if k[:2] == run.versions}  # drop stale ones
    cache = run.context_cache.setdefault((*run.versions, max_sentences, mode), {})
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
                                             cfg.embed_batch_size, mode=mode)
                    ctx = build_contexts(q_emb, ids, run.pindex.passages, sentence_cache(run), run.tokenizer,
                                         max_sentences, cfg.context_tokens, cfg.context_order)
                out.update({it["id"]: c for it, c in zip(part, ctx)})
            return out

        cache.update(sharded(work, len(todo)))
    return {it["id"]: cache[it["id"]] for it in items}


def prepare_phase(run: Run, kind: str, item_rows: list[int]) -> dict:
    """Retrieval results for the questions a phase will use, on every rank: {"contexts"} or {"candidates"}.

    A generator phase reads the contexts `retrieval` gives (dense, bm25 or the hybrid's fused list); a
    retriever phase trains the dense retriever, so its candidates (and contrastive contexts) are always dense.
    """
    cfg, items = run.cfg, [run.items[i] for i in item_rows]
    data: dict = {"phase_index": run.state.phase_index, "kind": kind}
    if kind == "generator" or cfg.retriever_loss == "contrastive":
        data["contexts"] = contexts_for(run, items, cfg.train_max_sentences, None if kind == "generator" else "dense")
    if kind == "retriever" and cfg.retriever_loss == "lm_supervised":
        def work(share: range) -> dict:
            mine = items[share.start:share.stop]
            with run.autocast():
                _, _, ids = retrieve(run.retriever, run.pindex, [it["question"] for it in mine],
                                     cfg.retriever_candidates, cfg.embed_batch_size, show_progress=True, mode="dense")
            return {it["id"]: row.tolist() for it, row in zip(mine, ids)}

        data["candidates"] = sharded(work, len(items))
    return data
