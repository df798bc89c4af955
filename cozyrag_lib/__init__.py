"""CoZyRAG: retrieval-augmented question answering you can train, notebook first.

The stages, each a function of one `Config` (see `config.py`) that writes named artefacts under
`outputs/runs/<run_name>/`:
    prepare_qa(cfg)      -> qa/{train,validation,test}.jsonl
    chunk_corpus(cfg)    -> passages/passages.jsonl
    build_index(cfg)     -> index/ (FAISS + embeddings + manifest, bm25/ the BM25 index)
    cozyrag_lib.train    -> final/{generator,retriever,index}, train/metrics.jsonl  (python -m / torchrun)
    RAG.load(run).answer(question), cozyrag_lib.evaluate.evaluate(rag, items)
Every path is named once, in `paths.RunPaths` (`cfg.paths`).

Names are imported on first use, so `python -m cozyrag_lib` and the config stay quick to load.
"""
import importlib

from .config import Config, load_config, notebook_config
from .errors import CozyError
from .paths import RunPaths

_LAZY = {
    "chunk_corpus": "chunking", "read_passages": "chunking", "PassageIndex": "index",
    "build_index": "index", "load_generator": "models", "load_retriever": "models", "load_qa_file": "qa_formats",
    "prepare_qa": "qa", "read_qa": "qa", "seeded_sample": "qa", "RAG": "rag", "answer": "rag",
}

__all__ = ["Config", "CozyError", "RunPaths", "load_config", "notebook_config", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cozyrag_lib' has no attribute '{name}'")
