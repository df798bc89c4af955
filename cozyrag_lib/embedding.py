"""Passage and question embeddings with the retriever: the texts an index holds, and the batched,
length-sorted, rank-sharded encoding that the index stage, training's refresh and retrieval share.

    emb = embed_corpus(retriever, passage_texts(passages), batch_size=64)   # (N, d) unit rows, on every rank
    q = embed_texts(retriever, ["Who was Albert Einstein?"])                # (1, d)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers.util import batch_to_device
from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from . import distributed
from .atomic import atomic_path
from .models import eval_mode, unwrap


def passage_texts(passages: list[dict]) -> list[str]:
    """The text the retriever embeds for each passage: its text, led by the article title.

    A chunk from the middle of an article often never names its subject ("It was founded in 1850"),
    so the title is put in front unless the text already starts with it.

    >>> passage_texts([{"title": "Paris", "text": "It has 2.1 million people."}])
    ['Paris: It has 2.1 million people.']
    """
    out = []
    for p in passages:
        title, text = p.get("title") or "", p["text"]
        out.append(text if not title or text.startswith(title) else f"{title}: {text}")
    return out


def embedding_dim(retriever) -> int:
    """Width of the retriever's sentence embeddings (384 for all-MiniLM-L6-v2)."""
    model = unwrap(retriever)
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def _token_lengths(model, texts: list[str]) -> np.ndarray:
    """Token count of each text (after truncation), used only to group similar lengths into batches."""
    tok = getattr(model, "tokenizer", None)
    if tok is None or not callable(tok):
        return np.array([len(t) for t in texts])
    lengths = np.empty(len(texts), dtype=np.int64)
    for s in range(0, len(texts), 8192):  # in slices: a corpus' worth of token lists would not fit in memory
        enc = tok(list(texts[s:s + 8192]), truncation=True, max_length=model.max_seq_length or None,
                  return_attention_mask=False, return_token_type_ids=False)
        lengths[s:s + 8192] = [len(ids) for ids in enc["input_ids"]]
    return lengths


def embed_texts(retriever, texts: list[str], batch_size: int = 64, show_progress: bool = True) -> np.ndarray:
    """(N, d) float32 unit vectors for `texts`, in the order given (inner product = cosine).

    The same numbers as `retriever.encode(texts, normalize_embeddings=True)`, with three differences
    that matter inside a training loop: batches hold texts of similar *token* length (less padding
    than grouping by characters), the retriever's train/eval mode is restored afterwards, and a DDP
    wrapper is looked through. Progress shows on rank 0 only.
    """
    model = unwrap(retriever)
    out = np.empty((len(texts), embedding_dim(model)), dtype=np.float32)  # (N, d)
    if len(texts) == 0:
        return out
    # longest first, so an out-of-memory batch shows up at once rather than at the end
    order = np.argsort(-_token_lengths(model, texts), kind="stable")
    preprocess = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers < 6: tokenize
    with eval_mode(model), torch.inference_mode():
        bar = range(0, len(texts), batch_size)
        for start in tqdm(bar, desc="embed", unit="batch", disable=not (show_progress and distributed.is_main_process())):
            rows = order[start:start + batch_size]  # (B,) positions in `texts`
            features = batch_to_device(preprocess([texts[i] for i in rows]), model.device)
            emb = model(features)["sentence_embedding"]  # (B, d)
            out[rows] = F.normalize(emb.float(), p=2, dim=1).cpu().numpy()
    return out


def embed_corpus(retriever, texts: list[str], batch_size: int = 64, out_path: str | Path | None = None) -> np.ndarray:
    """Embed `texts` across all ranks: each embeds its contiguous share, every rank gets all (N, d) rows.

    With `out_path`, rank 0 writes the array there (atomically) and returns it memory-mapped; other
    ranks return their in-memory copy (the file need not be on a disk they share).
    """
    share = distributed.shard(len(texts))
    local = embed_texts(retriever, texts[share.start:share.stop], batch_size)  # (n_rank, d)
    # shards are contiguous and gathered in rank order, so concatenating restores passage order
    emb = np.concatenate(distributed.all_gather_object(local))  # (N, d)
    if out_path is None:
        return emb
    if distributed.is_main_process():
        with atomic_path(out_path) as tmp:
            np.save(tmp, emb)
    distributed.barrier()
    return np.load(out_path, mmap_mode="r") if distributed.is_main_process() else emb
