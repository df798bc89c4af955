"""Stage 3: embed every passage with the retriever and put the vectors in a FAISS index; BM25 beside it.

Artefacts under `{run_dir}/index/` (one folder, swapped in atomically):
  * `index.faiss`     - the FAISS index (inner product on unit vectors = cosine similarity),
  * `embeddings.npy`  - (N, d) float32, L2-normalised, row i = passage i of `passages/passages.jsonl`,
  * `sentences.npy`, `sentence_offsets.npy` - every passage's sentence embeddings (float16) and where each
                        passage's rows start (`retrieval.SentenceVectors`; with `sentence_vectors`, the default):
                        answering ranks context sentences without encoding them,
  * `manifest.json`   - what the index was built from: retriever, dim, passage count and checksum,
                        factory and search settings, `version` (0 here; bumped by each refresh in training),
  * `config.json`     - the resolved config,
  * `bm25/`           - the BM25 index of the same passages with its own manifest (`cozyrag_lib.bm25`).

The functions are also the training loop's tools for refreshing the index after a retriever phase:
    emb = embed_corpus(retriever, passage_texts(passages), cfg.embed_batch_size)   # every rank
    index = make_faiss_index(emb, cfg.index_factory, cfg.nprobe, cfg.ef_search)     # rank 0 saves it
    save_index(cfg.paths.index, index, emb, {**manifest, "version": manifest["version"] + 1})

Reading it back:
    pidx = PassageIndex.load(cfg.paths.index, cfg.paths.passages, cfg.retriever)
    scores, ids = pidx.search_text(retriever, ["Who was Albert Einstein?"], k=4)   # (1, 4) each
    best = pidx.passages[ids[0, 0]]                                               # {"id", "title", "text"}
    pidx.configure(cfg, cfg.paths.bm25)    # cfg.retrieval: dense, bm25 or hybrid, what retrieval.retrieve uses
"""
from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import distributed
from .atomic import atomic_dir
from .bm25 import Bm25Index, reciprocal_rank_fusion, stem_function
from .chunking import read_passages
from .config import index_factory_error
from .embedding import embed_corpus, embed_texts, embedding_dim, passage_texts
from .errors import CozyError, faiss_reason, first_line
from .jsonio import read_json_object
from .models import autocast, load_retriever, retriever_identity
from .retrieval import SentenceVectors

INDEX_FILE = "index.faiss"
BM25_DIR = "bm25"  # the BM25 index, a folder inside index/ (RunPaths.bm25)
RETRIEVAL_MODES = ("dense", "bm25", "hybrid")
HYBRID_DEPTH = 100  # hybrid retrieval fuses the top max(k, HYBRID_DEPTH) of each list
EMBEDDINGS_FILE = "embeddings.npy"
MANIFEST_FILE = "manifest.json"
SENTENCES_FILE = "sentences.npy"
SENTENCE_OFFSETS_FILE = "sentence_offsets.npy"
CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------------------------
# FAISS


def _ivf_or_none(index):
    """The IVF part of `index` (also inside a pre-transform), or None."""
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None


def _min_train_points(index) -> int:
    """Vectors `index.train` needs at least: one per IVF cell, 2**nbits per PQ codebook."""
    import faiss

    need = 0
    ivf = _ivf_or_none(index)
    if ivf is not None:
        need = ivf.nlist
        ivf = faiss.downcast_index(ivf)
        if hasattr(ivf, "pq"):
            need = max(need, ivf.pq.ksub)
    top = faiss.downcast_index(index)
    if hasattr(top, "pq"):
        need = max(need, top.pq.ksub)
    return need


def _skip_polysemous_training(index) -> None:
    """Turn off the factory's polysemous code training for PQ indexes.

    It reorders PQ codes for Hamming-distance filtering, which plain search never uses (polysemous_ht
    is 0), and costs ~10x the rest of training: 150 s instead of 12 s for IVF44,PQ48 on 2,000 vectors.
    """
    import faiss

    for sub in (index, _ivf_or_none(index)):
        sub = faiss.downcast_index(sub) if sub is not None else None
        if sub is not None and hasattr(sub, "do_polysemous_training"):
            sub.do_polysemous_training = False


def new_faiss_index(factory: str, dim: int, n_train: int | None = None):
    """An empty inner-product index for `factory`; with `n_train`, check there are enough vectors to train it.

    Cheap, so `build_index` calls it before the slow embedding to fail early on a bad factory.
    """
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise index_factory_error(factory, e) from None
    _skip_polysemous_training(index)
    need = _min_train_points(index) if not index.is_trained else 0
    if n_train is not None and n_train < need:
        raise CozyError(f"config: index_factory={factory!r} needs at least {need} passages to train, but there are "
                        f"only {n_train}; use Flat or HNSW32, or fewer IVF cells")
    return index


def set_search_params(index, nprobe: int = 16, ef_search: int = 64) -> None:
    """Set the search-time knobs the index has: IVF cells visited (nprobe), HNSW depth (efSearch)."""
    import faiss

    ivf = _ivf_or_none(index)
    if ivf is not None:
        ivf.nprobe = nprobe
    top = faiss.downcast_index(index)
    if hasattr(top, "hnsw"):
        top.hnsw.efSearch = ef_search


def make_faiss_index(embeddings: np.ndarray, factory: str = "Flat", nprobe: int = 16, ef_search: int = 64):
    """A trained, filled FAISS inner-product index over `embeddings` (N, d).

    Factories: `Flat` (exact), `HNSW32` (graph), `IVF{n},Flat`, `IVF{n},PQ{m}` (n cells, m-byte codes).
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)  # (N, d); faiss wants C-contiguous float32
    if x.ndim != 2 or x.shape[0] == 0:
        raise CozyError(f"no passage embeddings to index (got an array of shape {x.shape}); "
                        "run the chunk stage first and check that it wrote passages")
    index = new_faiss_index(factory, x.shape[1], x.shape[0])
    if not index.is_trained:
        try:
            index.train(x)
        except RuntimeError as e:
            raise CozyError(f"config: index_factory={factory!r}: training failed on {x.shape[0]} passages "
                            f"({faiss_reason(e)})") from None
    index.add(x)
    set_search_params(index, nprobe, ef_search)
    return index


# ----------------------------------------------------------------------------------------------
# manifest, save, load


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_manifest(retriever: str, dim: int, passages_path: str | Path, n_passages: int, factory: str = "Flat",
                  nprobe: int = 16, ef_search: int = 64, version: int = 0) -> dict[str, Any]:
    """What an index was built from; `PassageIndex.load` refuses an index whose inputs changed since."""
    return {
        "version": version,  # 0 from the index stage; each refresh during training adds one
        "retriever": retriever_identity(retriever),
        "dim": int(dim),
        "passages": int(n_passages),
        "passages_file": Path(passages_path).name,
        "passages_sha256": file_sha256(passages_path),
        "index_factory": factory,
        "nprobe": nprobe,
        "ef_search": ef_search,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def save_index(index_dir: str | Path, faiss_index, embeddings: np.ndarray, manifest: dict, config=None,
               bm25: Bm25Index | None = None, sentences: SentenceVectors | None = None) -> Path:
    """Write index.faiss, embeddings.npy, manifest.json (and config.json, the BM25 index as bm25/, the
    passages' sentence vectors) as one folder, swapped in atomically."""
    import faiss

    index_dir = Path(index_dir)
    with atomic_dir(index_dir) as tmp:
        faiss.write_index(faiss_index, str(tmp / INDEX_FILE))
        np.save(tmp / EMBEDDINGS_FILE, np.asarray(embeddings, dtype=np.float32))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if config is not None:
            config.save(tmp / CONFIG_FILE)
        if bm25 is not None:
            bm25.save(tmp / BM25_DIR, atomic=False)
        if sentences is not None:
            np.save(tmp / SENTENCES_FILE, np.asarray(sentences.vectors, dtype=np.float16))
            np.save(tmp / SENTENCE_OFFSETS_FILE, np.asarray(sentences.offsets, dtype=np.int64))
    return index_dir


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CozyError(f"{path}: not found; build the index first (python -m cozyrag_lib index)")
    return read_json_object(path, "rebuild the index (python -m cozyrag_lib index)",
                            required=("retriever", "dim", "passages", "passages_sha256"))


REBUILD = "rebuild it with the index stage (python -m cozyrag_lib index)"


def load_sentence_vectors(index_dir: Path, n_passages: int, dim: int) -> SentenceVectors | None:
    """The index's stored sentence vectors (memory-mapped), None when it has none; refused when they do not
    fit its passages."""
    vec_path, off_path = index_dir / SENTENCES_FILE, index_dir / SENTENCE_OFFSETS_FILE
    if not vec_path.is_file() and not off_path.is_file():
        return None
    try:
        vectors, offsets = np.load(vec_path, mmap_mode="r"), np.load(off_path)
    except (OSError, ValueError) as e:
        raise CozyError(f"{index_dir}: cannot read the sentence vectors ({first_line(e)}); {REBUILD}") from None
    if (offsets.shape != (n_passages + 1,) or vectors.ndim != 2 or vectors.shape[1] != dim
            or int(offsets[-1]) != vectors.shape[0] or int(offsets[0]) != 0 or (np.diff(offsets) < 0).any()):
        raise CozyError(f"{vec_path}: {vectors.shape[0]} sentence vectors of dim {vectors.shape[-1]} with offsets "
                        f"for {len(offsets) - 1} passages do not fit an index of {n_passages} passages of dim {dim}; "
                        f"{REBUILD}")
    return SentenceVectors(offsets, vectors)


@dataclass
class PassageIndex:
    """A FAISS index with the passages its rows stand for, and how questions are retrieved from them.

    `index` (faiss.Index), `passages` (list of {id, title, text}, row i = passage i), `manifest`,
    `embeddings` ((N, d) memory-mapped, when loaded from disk), `sentences` (the passages' sentence vectors,
    memory-mapped, when the index has them); `retrieval` ("dense", "bm25" or "hybrid",
    what `retrieval.retrieve` does by default), `rrf_k`, and the BM25 index (`bm25`, loaded from
    `bm25_dir` on first use, its tokenizer settings checked against `bm25_stemmer`).
    """

    index: Any
    passages: list[dict]
    manifest: dict[str, Any]
    embeddings: np.ndarray | None = None
    retrieval: str = "dense"
    rrf_k: int = 60
    bm25: Bm25Index | None = None
    bm25_dir: Path | None = None
    bm25_stemmer: str | None = None  # None: whatever the index was built with
    sentences: SentenceVectors | None = None

    def __len__(self) -> int:
        return self.index.ntotal

    @classmethod
    def load(cls, index_dir: str | Path, passages_path: str | Path, retriever: str | None = None,
             expected_dim: int | None = None) -> "PassageIndex":
        """Load `index_dir`, refusing it when it was built from another retriever, dim or passages file."""
        import faiss

        index_dir, passages_path = Path(index_dir), Path(passages_path)
        manifest_path = index_dir / MANIFEST_FILE
        m = read_manifest(index_dir)
        built = f"{manifest_path} was built for"
        if retriever is not None and retriever_identity(retriever) != m["retriever"]:
            raise CozyError(f"{built} retriever {m['retriever']} (dim {m['dim']}) but the config asks for "
                            f"{retriever_identity(retriever)}; {REBUILD}")
        if expected_dim is not None and int(expected_dim) != m["dim"]:
            raise CozyError(f"{built} dim {m['dim']} (retriever {m['retriever']}) but the retriever gives dim "
                            f"{expected_dim}; {REBUILD}")
        if not passages_path.is_file():
            raise CozyError(f"{passages_path}: not found; run the chunk stage first (python -m cozyrag_lib chunk)")
        sha = file_sha256(passages_path)
        if sha != m["passages_sha256"]:
            raise CozyError(f"{built} passages sha256 {m['passages_sha256'][:12]}..., but {passages_path} is "
                            f"{sha[:12]}... (the passages changed); {REBUILD}")
        passages = read_passages(passages_path)
        if len(passages) != m["passages"]:
            raise CozyError(f"{built} {m['passages']} passages, but {passages_path} has {len(passages)}; {REBUILD}")
        index_path = index_dir / INDEX_FILE
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as e:
            raise CozyError(f"{index_path}: cannot read the FAISS index ({faiss_reason(e)}); {REBUILD}") from None
        if index.ntotal != m["passages"] or index.d != m["dim"]:
            raise CozyError(f"{index_path} holds {index.ntotal} vectors of dim {index.d}, but {manifest_path} says "
                            f"{m['passages']} of dim {m['dim']}; {REBUILD}")
        set_search_params(index, m.get("nprobe", 16), m.get("ef_search", 64))
        emb_path = index_dir / EMBEDDINGS_FILE
        embeddings = np.load(emb_path, mmap_mode="r") if emb_path.is_file() else None
        return cls(index=index, passages=passages, manifest=m, embeddings=embeddings,
                   sentences=load_sentence_vectors(index_dir, len(passages), m["dim"]))

    def sentence_store(self) -> tuple[SentenceVectors, list[dict]] | None:
        """(sentence vectors, passages) for a `SentenceCache`, or None when the index has none."""
        return None if self.sentences is None else (self.sentences, self.passages)

    def search(self, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k passages per query: (scores (n, k) float32 cosine, ids (n, k) int64 rows of `passages`).

        Approximate indexes (HNSW, IVF with a small nprobe) may find fewer than k passages when k nears
        the index size; FAISS pads those rows with id -1, which must be skipped, not used as an index.
        """
        q = np.ascontiguousarray(query_embeddings, dtype=np.float32)
        q = q[None] if q.ndim == 1 else q  # (n, d)
        if q.shape[1] != self.index.d:
            raise CozyError(f"query embeddings have dim {q.shape[1]} but the index has dim {self.index.d} "
                            f"(built for retriever {self.manifest.get('retriever')})")
        return self.index.search(q, min(k, self.index.ntotal))

    def search_text(self, retriever, questions: list[str], k: int, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """`search` for raw questions, embedded with `retriever`."""
        return self.search(embed_texts(retriever, list(questions), batch_size, show_progress=False), k)

    # --- retrieval modes ---------------------------------------------------------------------

    def configure(self, cfg, bm25_dir: str | Path | None) -> "PassageIndex":
        """Take `retrieval`, `rrf_k` and `bm25_stemmer` from the config; load the BM25 index now when the mode
        needs it (so a missing or mismatched one fails at load time, not at the first question)."""
        self.retrieval, self.rrf_k, self.bm25_stemmer = cfg.retrieval, cfg.rrf_k, cfg.bm25_stemmer
        self.bm25_dir = Path(bm25_dir) if bm25_dir is not None else None
        if self.retrieval != "dense":
            self.bm25_index()
        return self

    def has_bm25(self) -> bool:
        """True when a BM25 index is loaded or there is one to load."""
        return self.bm25 is not None or (self.bm25_dir is not None and (self.bm25_dir / MANIFEST_FILE).is_file())

    def bm25_index(self) -> Bm25Index:
        """The BM25 index, loaded (memory-mapped) on first use and refused if built from other passages or settings."""
        if self.bm25 is None:
            if self.bm25_dir is None:
                raise CozyError(f"retrieval={self.retrieval!r} needs a BM25 index, and this passage index "
                                f"({self.manifest.get('passages_file', 'in memory')}) has none")
            self.bm25 = Bm25Index.load(self.bm25_dir, self.manifest.get("passages_sha256"), len(self.passages),
                                       self.bm25_stemmer)
        return self.bm25

    def with_retrieval(self, mode: str) -> "PassageIndex":
        """The same index and passages (shared, not copied) retrieving by `mode`."""
        if mode not in RETRIEVAL_MODES:
            raise CozyError(f"retrieval must be one of {', '.join(RETRIEVAL_MODES)}, got {mode!r}")
        if mode != "dense":
            self.bm25_index()  # loaded once, shared by both
        return replace(self, retrieval=mode)

    def search_questions(self, q_emb: np.ndarray, questions: list[str], k: int,
                         mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k passages for questions (their text, and their unit embeddings `q_emb` (n, d)) by `mode`
        (default `self.retrieval`): (scores (n, k), ids (n, k); -1 = nothing found).

        dense: FAISS cosine. bm25: BM25 scores. hybrid: reciprocal-rank fusion of the top max(k, HYBRID_DEPTH)
        of both, scores sum(1 / (rrf_k + rank)).
        """
        mode = mode or self.retrieval
        k = min(k, len(self))
        if mode == "dense":
            return self.search(q_emb, k)
        if mode == "bm25":
            return self.bm25_index().search(questions, k)
        if mode != "hybrid":
            raise CozyError(f"retrieval must be one of {', '.join(RETRIEVAL_MODES)}, got {mode!r}")
        depth = min(len(self), max(k, HYBRID_DEPTH))
        _, dense_ids = self.search(q_emb, depth)
        _, bm25_ids = self.bm25_index().search(questions, depth)
        return reciprocal_rank_fusion([dense_ids, bm25_ids], k, self.rrf_k)


# ----------------------------------------------------------------------------------------------
# the stage


def build_index(cfg) -> dict[str, Any]:
    """The `index` stage: embed `{run_dir}/passages/passages.jsonl` (across ranks under torchrun); rank 0 builds
    the FAISS and the BM25 index and writes `index/` (with `index/bm25/`)."""
    cfg.paths.upgrade()
    passages_path = cfg.paths.passages
    if not passages_path.is_file() or passages_path.stat().st_size == 0:
        what = "not found" if not passages_path.is_file() else "empty"
        raise CozyError(f"{passages_path}: {what}; run the chunk stage first (python -m cozyrag_lib chunk)")
    with distributed.process_group(cfg.device) as device:
        t0 = time.time()
        passages = read_passages(passages_path)
        if not passages:
            raise CozyError(f"{passages_path}: no passages; run the chunk stage first (python -m cozyrag_lib chunk)")
        retriever = load_retriever(cfg.retriever, device=str(device), trust_remote_code=cfg.trust_remote_code)
        dim = embedding_dim(retriever)
        new_faiss_index(cfg.index_factory, dim, len(passages))  # a bad factory fails now, not after embedding
        stem_function(cfg.bm25_stemmer)  # so does a stemmer PyStemmer lacks
        t_embed = time.time()
        with autocast(cfg.precision, device):  # bf16 where fast, as training's index refresh does
            embeddings = embed_corpus(retriever, passage_texts(passages), cfg.embed_batch_size)  # (N, d) on every rank
        t_embed = time.time() - t_embed
        t_sent, sentences = time.time(), None
        if cfg.sentence_vectors:  # each passage's sentences, so answering ranks context sentences without encoding
            with autocast(cfg.precision, device):
                sentences = SentenceVectors.embed(retriever, passages, cfg.embed_batch_size)
        t_sent = time.time() - t_sent
        summary = None
        if distributed.is_main_process():
            index = make_faiss_index(embeddings, cfg.index_factory, cfg.nprobe, cfg.ef_search)
            manifest = make_manifest(cfg.retriever, dim, passages_path, len(passages), cfg.index_factory,
                                     cfg.nprobe, cfg.ef_search, version=0)
            # BM25 over the same title-led texts, built once (rank 0) and saved inside the same atomic index/
            bm25 = Bm25Index.build(passage_texts(passages), cfg.bm25_stemmer, manifest["passages_sha256"])
            index_dir = save_index(cfg.paths.index, index, embeddings, manifest, config=cfg, bm25=bm25,
                                   sentences=sentences)
            summary = {"index_dir": str(index_dir), **manifest, "world_size": distributed.get_world_size(),
                       "embed_seconds": round(t_embed, 2),
                       "sentences": 0 if sentences is None else int(sentences.offsets[-1]),
                       "sentence_seconds": round(t_sent, 2), "bm25_seconds": bm25.manifest["build_seconds"],
                       "bm25_bytes": bm25.manifest["bytes"], "seconds": round(time.time() - t0, 2)}
        distributed.barrier()  # other ranks may read index/ (FAISS and BM25) only once rank 0 has swapped it in
        return distributed.broadcast_object(summary)

