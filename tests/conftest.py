"""Shared fixtures: tiny models built once per session, real QA data from ../shared/data, tmp run folders."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real QA data lives beside the repository (never copied in); COZYRAG_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("COZYRAG_SHARED_DATA", ROOT.parent / "shared" / "data"))
SQUAD_FILE = SHARED_DATA / "squad" / "squad-v1.1-dev-39-articles.json"
NQ_FILE = SHARED_DATA / "nq_open" / "NQ-open.efficientqa.dev.1.1.sample.jsonl"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Where converted/tiny models are cached. Set COZYRAG_TEST_MODEL_CACHE to reuse one between runs."""
    env = os.environ.get("COZYRAG_TEST_MODEL_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_generator(model_cache):
    """(model, tokenizer): a 2-layer random GPT-2 with the SmolLM2 tokenizer."""
    from cozyrag_lib.models import load_generator

    return load_generator("tiny:gpt2", model_cache)


@pytest.fixture(scope="session")
def retriever():
    """The packaged all-MiniLM-L6-v2 (real weights, loaded offline)."""
    from cozyrag_lib.models import load_retriever

    return load_retriever("embedded:all-minilm-l6-v2", device="cpu")


@pytest.fixture
def tiny_cfg(tmp_path, model_cache):
    """The tiny preset writing into a fresh tmp folder."""
    from cozyrag_lib.config import load_config

    return load_config("tiny", out_root=str(tmp_path / "runs"), model_cache=str(model_cache))


@pytest.fixture
def squad_file() -> Path:
    if not SQUAD_FILE.is_file():
        pytest.skip(f"real SQuAD sample not found at {SQUAD_FILE}")
    return SQUAD_FILE


@pytest.fixture
def nq_file() -> Path:
    if not NQ_FILE.is_file():
        pytest.skip(f"real NQ-open sample not found at {NQ_FILE}")
    return NQ_FILE


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run `python -m cozyrag_lib ARGS` in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "cozyrag_lib", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


def tiny_stages(out_root: Path, model_cache: Path, **overrides):
    """Config of a tiny run under `out_root` with stages 1-3 done (QA splits, passages, index)."""
    from cozyrag_lib import build_index, chunk_corpus, load_config, prepare_qa

    cfg = load_config("tiny", out_root=str(out_root), model_cache=str(model_cache), **overrides)
    prepare_qa(cfg)
    chunk_corpus(cfg)
    build_index(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, model_cache):
    """Config of a tiny run with stages 1-3 done; shared, treat as read-only."""
    return tiny_stages(tmp_path_factory.mktemp("runs"), model_cache)
