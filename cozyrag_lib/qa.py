"""Stage 1: question-answer pairs from the built-in corpus and from QA files, split into train/validation/test.

Every source yields the record of `qa_formats.py`, which is also one line of `qa/{train,validation,test}.jsonl`:
    {"id": str, "question": str, "answers": [str, ...], "title": str (optional), "context": str (optional),
     "source": str, "qtype": str (optional: what kind of answer), "rule": str (optional: how it was derived)}

Sources (`cfg.qa_sources`, each "builtin" or a file path; `cfg.qa_format` names the file format or "auto"):
  * builtin - questions about the embedded Wikipedia summaries: one per article answered by its description
              ("Who was Alvar Aalto?" -> "Finnish architect and designer (1898–1976)", qtype "description"), and
              factoids whose answers are spans of the article's text ("What is the capital of France?" ->
              "Paris"; qtype person, place, date, number or thing; see factoids.py);
  * a file  - SQuAD JSON, Q:/A: text (qabot), TSV or JSON lines: see qa_formats.py;
  * a table - a Parquet, Arrow or CSV file, or `hf:NAME[:CONFIG][:SPLIT]` from Hugging Face: see tables.py.

The split is a pure function of the article title (of the question when there is none), so the same article
lands in the same split on every machine and in every run, and no test article leaks into training:
    >>> split_of("Super_Bowl_50")   # sha1 % 10: 0 -> test, 1 -> validation, else train
    'validation'
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from .atomic import atomic_dir
from .corpus import EMBEDDED_CORPUS, embedded_articles, embedded_text
from .errors import CozyError
from .factoids import article_factoids
from .jsonio import iter_jsonl, write_json, write_jsonl
from .metrics import normalize_answer
from .paths import SPLITS, RunPaths
from .qa_formats import MAX_EXAMPLES, Skip, Skips, load_qa_file, make_item, source_stats
from .tables import load_qa_table, table_kind

BUILTIN = "builtin"

# Questions about things other than people; one is picked per article by a hash of its title, so the set
# is varied but the same on every run.
WHAT_FORMS = ("What is {}?", "What does {} refer to?", "Describe {}.", "What kind of thing is {}?")


# ----------------------------------------------------------------------------------------------------------
# splits, duplicates

def split_of(key: str) -> str:
    """The split of an article title (or of a question without one): sha1 % 10 -> 0 test, 1 validation, else train.

    >>> [split_of(t) for t in ("Normans", "Geology", "Super_Bowl_50")]
    ['train', 'test', 'validation']
    """
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def split_key(item: dict) -> str:
    """What an item is split by: its title when it has one, else its question."""
    return item.get("title") or item["question"]


def dedup_key(item: dict) -> tuple[str, frozenset[str]]:
    """Two items are duplicates when their normalised questions and normalised answer sets are equal."""
    return normalize_answer(item["question"]), frozenset(normalize_answer(a) for a in item["answers"])


# ----------------------------------------------------------------------------------------------------------
# the built-in set

def builtin_question(title: str, topic: str) -> str:
    """ "Who was X?" for people; otherwise one of WHAT_FORMS picked by a hash of the title.

    The hash is salted so the form is independent of the split (both would otherwise come from sha1(title)).
    >>> builtin_question("Alvar Aalto", "People")
    'Who was Alvar Aalto?'
    """
    if topic == "People":
        return f"Who was {title}?"
    h = int(hashlib.sha1(f"form:{title}".encode("utf-8")).hexdigest(), 16)
    return WHAT_FORMS[h % len(WHAT_FORMS)].format(title)


def builtin_qa(max_articles: int = 0, descriptions: bool = True) -> tuple[list[dict], dict]:
    """Questions about the embedded articles (same stats as load_qa_file; prepare_qa counts them per qtype).

    Per article (`corpus.embedded_articles`, the same first `max_articles` as the `embedded` corpus source): its
    description question ("What is X?" -> the one-line description, qtype "description"), then up to
    factoids.MAX_PER_ARTICLE factoids whose answers are spans of the article's lead. Every item's context
    is the article's text as stage 2 reads it (`corpus.embedded_text`: led by its description line where
    `descriptions`).
    """
    items, skips = [], Skips(BUILTIN)
    for art in embedded_articles(max_articles):
        title, desc, context = art["title"], art.get("description") or "", embedded_text(art, descriptions)
        try:
            if not desc.strip():
                raise Skip("empty description")
            question = builtin_question(title, art.get("topic") or "")
            items.append({**make_item(BUILTIN, question, [desc], title=title, context=context), "qtype": "description"})
        except Skip as s:
            skips.add(repr(title), s)
        for f in article_factoids(art):
            items.append({**make_item(BUILTIN, f.question, f.answers, title=title, context=context),
                          "qtype": f.qtype, "rule": f.rule})
    return items, source_stats(EMBEDDED_CORPUS, BUILTIN, items, 0, skips)


def load_qa_source(spec: str, cfg) -> tuple[list[dict], dict]:
    """The items and stats of one entry of qa_sources or qa_extra: the built-in set, a table or a QA file."""
    if spec == BUILTIN:
        return builtin_qa(cfg.max_articles, cfg.embedded_descriptions)
    if table_kind(spec):
        return load_qa_table(spec, cfg.qa_columns)
    return load_qa_file(spec, cfg.qa_format)


# ----------------------------------------------------------------------------------------------------------
# the stage

def prepare_qa(cfg) -> dict:
    """Read every QA source, drop duplicates, split, and write `{run_dir}/qa/` (swapped in atomically).

    Writes `train.jsonl`, `validation.jsonl`, `test.jsonl`, `summary.json` and `config.json`; returns the summary.
    Every source is read before anything is written, so a bad source leaves an existing `qa/` untouched.
    """
    cfg.paths.upgrade()  # a run of the earlier flat layout: into the per-stage folders first
    if not cfg.qa_sources:
        raise CozyError("config: qa_sources is empty; give 'builtin' and/or QA files")
    seen: set = set()
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    sources: dict[str, dict] = {}
    for entry in tqdm(cfg.qa_sources, desc="QA sources", disable=len(cfg.qa_sources) < 3):
        items, stats = load_qa_source(entry, cfg)
        kept, duplicates = [], 0
        for item in items:
            if cfg.max_qa and len(kept) >= cfg.max_qa:
                break
            key = dedup_key(item)
            if key in seen:  # across sources too: the first source to bring a pair keeps it
                duplicates += 1
                continue
            seen.add(key)
            kept.append(item)
        per_split, per_type = Counter(), {}
        for item in kept:
            split = split_of(split_key(item))
            splits[split].append(item)
            per_split[split] += 1
            if "qtype" in item:
                per_type.setdefault(item["qtype"], Counter())[split] += 1
        name = entry if entry not in sources else f"{entry}#{len(sources) + 1}"
        sources[name] = {**stats, "duplicates": duplicates, "capped": len(items) - len(kept) - duplicates,
                         "kept": len(kept), "splits": {s: per_split[s] for s in SPLITS}}
        if per_type:  # the built-in set: questions per answer type and split
            sources[name]["qtype_splits"] = {t: {s: c[s] for s in SPLITS} for t, c in sorted(per_type.items())}

    total = sum(len(v) for v in splits.values())  # > 0: the first source keeps at least one pair
    out = cfg.paths.qa
    summary = {
        "total": total,
        "splits": {s: len(splits[s]) for s in SPLITS},
        "duplicates_dropped": sum(s["duplicates"] for s in sources.values()),
        "unanswerable_skipped": sum(s["unanswerable"] for s in sources.values()),
        "rejected": sum(s["skipped"] for s in sources.values()),
        "rejected_reasons": dict(sum((Counter(s["skip_reasons"]) for s in sources.values()), Counter())),
        "rejected_examples": [e for s in sources.values() for e in s["skip_examples"]][:MAX_EXAMPLES],
        "sources": sources,
        "warnings": [f"split '{s}' is empty" for s in SPLITS if not splits[s]],
        "files": {s: str(cfg.paths.qa_split(s)) for s in SPLITS},
    }
    with atomic_dir(out) as tmp:  # built under a temporary name, then swapped in for `out`
        for s in SPLITS:
            write_jsonl(tmp / cfg.paths.qa_split(s).name, splits[s])
        write_json(RunPaths.summary(tmp), summary)
        cfg.save(RunPaths.config(tmp))
    return summary


def read_qa(path: str | Path) -> list[dict]:
    """Items of a `qa/{split}.jsonl` written by prepare_qa; a missing or damaged file is a CozyError."""
    path = Path(path)
    if not path.is_file():
        raise CozyError(f"{path}: QA split not found; run `python -m cozyrag_lib prepare-qa` (or notebook 01) first")
    items = []
    for n, rec in iter_jsonl(path, fix="rerun prepare-qa"):
        ok = (isinstance(rec, dict) and isinstance(rec.get("id"), str) and isinstance(rec.get("question"), str)
              and isinstance(rec.get("answers"), list) and rec["answers"]
              and all(isinstance(a, str) for a in rec["answers"]))
        if not ok:
            raise CozyError(f"{path}:{n}: not a QA record (needs id, question and a list of answers); rerun prepare-qa")
        items.append(rec)
    return items


def seeded_sample(items: list, n: int, seed: int) -> list:
    """At most n items (0 = all), drawn with a seed and kept in file order; not the first n, since QA
    files are sorted by source and split."""
    if not n or len(items) <= n:
        return items
    keep = np.random.default_rng(seed).permutation(len(items))[:n]
    return [items[i] for i in sorted(keep)]
