"""CoZyRAG: retrieval-augmented question answering you can train, notebook first."""
from .config import Config, load_config, notebook_config
from .errors import CozyError
from .models import load_generator, load_retriever

__all__ = ["Config", "CozyError", "load_config", "load_generator", "load_retriever", "notebook_config"]
