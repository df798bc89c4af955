"""CoZyRAG: retrieval-augmented question answering you can train, notebook first.

The stages, each a function of one `Config` (see `config.py`) that writes named artefacts under
`outputs/runs/<run_name>/`:
    prepare_qa(cfg)      -> qa/{train,validation,test}.jsonl
    chunk_corpus(cfg)    -> passages.jsonl
    build_index(cfg)     -> index/ (FAISS + embeddings + manifest)
    cozyrag_lib.train    -> final/{generator,retriever,index}, metrics.jsonl  (python -m / torchrun)
    RAG.load(run).answer(question), evaluate(rag, items)
"""
from .chunking import chunk_corpus, read_passages
from .config import Config, load_config, notebook_config
from .errors import CozyError
from .evaluate import evaluate
from .index import PassageIndex, build_index
from .models import load_generator, load_retriever
from .qa import load_qa_file, prepare_qa, read_qa
from .rag import RAG, answer

__all__ = ["Config", "CozyError", "PassageIndex", "RAG", "answer", "build_index", "chunk_corpus", "evaluate",
           "load_config", "load_generator", "load_qa_file", "load_retriever", "notebook_config", "prepare_qa",
           "read_passages", "read_qa"]
