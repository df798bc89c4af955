"""The BM25 index beside the FAISS one (bm25s), its manifest, and reciprocal-rank fusion for hybrid retrieval.

Stage 3 builds it from the same title-led passage texts the retriever embeds and saves it under
`{run_dir}/index/bm25/` (bm25s' own files: sparse score matrix as .npy arrays, vocabulary, parameters;
loaded memory-mapped) with a `manifest.json` of what it was built from: passage count and checksum,
and the tokenizer settings a query must be tokenized with (lower-case, bm25s' token pattern, English
stop words, the `bm25_stemmer`). Loading refuses an index whose passages or tokenizer settings differ.
The passages never change during training, so an index refresh after a retriever phase leaves it alone.

    bm = Bm25Index.build(passage_texts(passages), stemmer="english")
    bm.save(cfg.paths.bm25)
    bm = Bm25Index.load(cfg.paths.bm25, passages_sha256=sha, n_passages=len(passages), stemmer="english")
    scores, ids = bm.search(["Who wrote Pride and Prejudice?"], k=5)   # (1, 5) each; id -1: no term matched

Hybrid retrieval fuses the dense and the BM25 ranking by reciprocal rank (Cormack et al. 2009):
score(p) = sum over the lists of 1 / (rrf_k + rank of p in that list), rank 1-based, `rrf_k` = 60 by default.
"""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import atomic_dir
from .errors import CozyError
from .jsonio import read_json_object

MANIFEST_FILE = "manifest.json"
REBUILD = "rebuild it with the index stage (python -m cozyrag_lib index)"
K1, B = 0.9, 0.4  # Anserini's BM25 defaults, which pyserini's baselines (the DPR paper's BM25 row) use
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # bm25s' default (scikit-learn's CountVectorizer)
STOPWORDS = "en"  # bm25s' English stop-word list
# what a query must be tokenized with to match the index; `stemmer` comes from the config (bm25_stemmer)
QUERY_SETTINGS = ("lower", "token_pattern", "stopwords", "stemmer")


def stem_function(name: str):
    """PyStemmer's stemWords for a Snowball algorithm name, or None for "none"."""
    if name == "none":
        return None
    try:
        import Stemmer
    except ImportError:
        raise CozyError(f"config: bm25_stemmer={name!r} needs PyStemmer (pip install PyStemmer); "
                        "or set bm25_stemmer=none") from None
    try:
        return Stemmer.Stemmer(name).stemWords
    except KeyError:
        raise CozyError(f"config: bm25_stemmer={name!r} is not a Snowball stemmer (known: none, "
                        f"{', '.join(sorted(Stemmer.algorithms()))})") from None


def tokenizer_settings(stemmer: str) -> dict[str, Any]:
    return {"lower": True, "token_pattern": TOKEN_PATTERN, "stopwords": STOPWORDS, "stemmer": stemmer}


def _tokenize(texts: Sequence[str], stem, return_ids: bool):
    """bm25s' tokens of `texts` with the index's settings; `stem` a stemWords function or None."""
    import bm25s

    return bm25s.tokenize(list(texts), lower=True, token_pattern=TOKEN_PATTERN, stopwords=STOPWORDS, stemmer=stem,
                          return_ids=return_ids, show_progress=False)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


@dataclass
class Bm25Index:
    """A bm25s.BM25 model over the passages (row i = passage i) with the settings it was built with."""

    model: Any
    manifest: dict[str, Any]
    _stem: Any = field(default=None, repr=False)

    def __post_init__(self):
        self._stem = stem_function(self.manifest["stemmer"])

    def __len__(self) -> int:
        return int(self.model.scores["num_docs"])

    @classmethod
    def build(cls, texts: Sequence[str], stemmer: str = "english", passages_sha256: str | None = None) -> "Bm25Index":
        """Tokenize and index `texts` (the passages' title-led texts, `index.passage_texts`)."""
        import bm25s

        if not texts:
            raise CozyError("no passages to build the BM25 index from; run the chunk stage first")
        t0 = time.time()
        model = bm25s.BM25(k1=K1, b=B, method="lucene")
        model.index(_tokenize(texts, stem_function(stemmer), return_ids=True), show_progress=False)
        manifest = {"passages": len(texts), "passages_sha256": passages_sha256, **tokenizer_settings(stemmer),
                    "k1": K1, "b": B, "method": "lucene", "vocabulary": len(model.vocab_dict),
                    "bm25s": bm25s.__version__, "build_seconds": round(time.time() - t0, 3),
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        return cls(model=model, manifest=manifest)

    def save(self, bm25_dir: str | Path, atomic: bool = True) -> Path:
        """bm25s' files and manifest.json in `bm25_dir` (a folder swapped in atomically, unless `atomic=False`
        because the caller's folder is itself being written atomically)."""
        bm25_dir = Path(bm25_dir)
        if atomic:
            with atomic_dir(bm25_dir) as tmp:
                self.save(tmp, atomic=False)
            return bm25_dir
        bm25_dir.mkdir(parents=True, exist_ok=True)
        self.model.save(str(bm25_dir), show_progress=False)
        self.manifest["bytes"] = _dir_bytes(bm25_dir)  # bm25s' files; the manifest is a few hundred bytes more
        (bm25_dir / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2) + "\n", encoding="utf-8")
        return bm25_dir

    @classmethod
    def load(cls, bm25_dir: str | Path, passages_sha256: str | None = None, n_passages: int | None = None,
             stemmer: str | None = None) -> "Bm25Index":
        """Load `bm25_dir` memory-mapped, refusing it when it was built from other passages or tokenizer settings."""
        import bm25s

        bm25_dir = Path(bm25_dir)
        path = bm25_dir / MANIFEST_FILE
        if not path.is_file():
            raise CozyError(f"{path}: not found (an index built before BM25 support, or not built); {REBUILD}")
        m = read_json_object(path, REBUILD, required=("passages", "passages_sha256", *QUERY_SETTINGS))
        built = f"{path} was built for"
        if passages_sha256 is not None and m["passages_sha256"] != passages_sha256:
            raise CozyError(f"{built} passages sha256 {str(m['passages_sha256'])[:12]}..., but the passages file is "
                            f"{passages_sha256[:12]}... (the passages changed); {REBUILD}")
        if n_passages is not None and m["passages"] != n_passages:
            raise CozyError(f"{built} {m['passages']} passages, but there are {n_passages}; {REBUILD}")
        want = tokenizer_settings(m["stemmer"] if stemmer is None else stemmer)
        diff = [f"{k} {m[k]!r} (the config asks for {want[k]!r})" for k in QUERY_SETTINGS if m[k] != want[k]]
        if diff:
            raise CozyError(f"{built} {', '.join(diff)}; {REBUILD}, or set bm25_stemmer={m['stemmer']}")
        try:
            model = bm25s.BM25.load(str(bm25_dir), mmap=True, show_progress=False)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CozyError(f"{bm25_dir}: cannot read the BM25 index ({reason}); {REBUILD}") from None
        if int(model.scores["num_docs"]) != m["passages"]:
            raise CozyError(f"{bm25_dir} holds {model.scores['num_docs']} documents, but {path} says {m['passages']}; "
                            f"{REBUILD}")
        return cls(model=model, manifest=m)

    def search(self, questions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k passages per question by BM25: (scores (n, k) float32, ids (n, k) int64).

        Only passages that share a term with the question are hits; the rest of a row is id -1, score 0.
        """
        k = min(k, len(self))
        scores = np.zeros((len(questions), k), np.float32)
        ids = np.full((len(questions), k), -1, np.int64)
        vocab = self.model.vocab_dict
        for i, tokens in enumerate(_tokenize(questions, self._stem, return_ids=False)):
            term_ids = [vocab[t] for t in tokens if t in vocab]
            if not term_ids or k == 0:
                continue
            s = self.model.get_scores_from_ids(term_ids)  # (N,)
            top = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
            top = top[np.lexsort((top, -s[top]))]  # best first; ties: lower row first (deterministic)
            top = top[s[top] > 0]
            scores[i, :len(top)], ids[i, :len(top)] = s[top], top
        return scores, ids


def reciprocal_rank_fusion(rankings: Sequence[np.ndarray], k: int, rrf_k: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Fuse per-question rankings (each (n, depth) rows of passage ids, best first, -1 = none) into the top k.

    score(p) = sum over rankings of 1 / (rrf_k + rank), rank 1-based; ties go to the passage the first
    ranking placed higher, then the lower row. Returns (scores (n, k) float32, ids (n, k) int64; -1 padded).

    >>> s, i = reciprocal_rank_fusion([np.array([[3, 1, 2]]), np.array([[1, 4, -1]])], k=3, rrf_k=60)
    >>> i.tolist(), [round(float(x) * 61 * 62, 3) for x in s[0]]
    ([[1, 3, 4]], [123.0, 62.0, 61.0])
    """
    n = len(rankings[0])
    scores, ids = np.zeros((n, k), np.float32), np.full((n, k), -1, np.int64)
    for q in range(n):
        fused: dict[int, list] = {}  # id -> [score, -best rank in the first ranking]
        for r, ranking in enumerate(rankings):
            for rank, pid in enumerate(ranking[q].tolist(), 1):
                if pid < 0:
                    continue
                entry = fused.setdefault(pid, [0.0, float("-inf")])
                entry[0] += 1.0 / (rrf_k + rank)
                if r == 0:
                    entry[1] = -rank
        best = sorted(fused.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[:k]
        for j, (pid, (score, _)) in enumerate(best):
            ids[q, j], scores[q, j] = pid, score
    return scores, ids
