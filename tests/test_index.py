"""Stage 3: embedding, FAISS indexes, the manifest guard, the CLI and a real 2-process torchrun build."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_cli
from cozyrag_lib.chunking import chunk_corpus
from cozyrag_lib.corpus import embedded_corpus
from cozyrag_lib.errors import CozyError
from cozyrag_lib.embedding import embed_corpus, embed_texts, passage_texts
from cozyrag_lib.index import PassageIndex, build_index, make_faiss_index, make_manifest, save_index
from cozyrag_lib.models import EMBEDDED_RETRIEVER
from cozyrag_lib.paths import RunPaths

N_PASSAGES = 200


def corpus_passages(n: int, step: int = 37) -> list[dict]:
    """`n` real passages: lead sections of the embedded Wikipedia corpus, spread over its topics."""
    articles = list(embedded_corpus().values())
    picked = articles[::step][:n]
    return [{"id": f"p{i}", "title": a["title"], "text": " ".join(a["extract"].split())} for i, a in enumerate(picked)]


def write_passages(path, passages: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in passages), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def embedded(retriever):
    """(passages, (N, 384) embeddings) computed once for the module."""
    passages = corpus_passages(N_PASSAGES)
    return passages, embed_texts(retriever, passage_texts(passages), batch_size=64, show_progress=False)


def save_built(tmp_path, passages, embeddings, factory="Flat"):
    """Write passages.jsonl and index/ the way the index stage does; return (index_dir, passages_path)."""
    passages_path = write_passages(tmp_path / "passages.jsonl", passages)
    index = make_faiss_index(embeddings, factory)
    manifest = make_manifest(EMBEDDED_RETRIEVER, embeddings.shape[1], passages_path, len(passages), factory)
    return save_index(tmp_path / "index", index, embeddings, manifest), passages_path


# ---- embedding ------------------------------------------------------------------------------


def test_embed_texts_equals_raw_encode(retriever):
    """Reference equivalence: the length-bucketed loop gives sentence-transformers' own numbers, in order."""
    texts = [p["text"] for p in corpus_passages(16, step=601)] + ["Short.", "Who was Albert Einstein?"]
    retriever.train()  # as inside a training loop: the mode must survive embedding
    ours = embed_texts(retriever, texts, batch_size=8, show_progress=False)
    assert retriever.training
    raw = retriever.encode(texts, batch_size=8, normalize_embeddings=True, convert_to_numpy=True)
    retriever.train()  # encode() leaves the model in eval mode
    assert ours.dtype == np.float32 and ours.shape == (len(texts), 384)
    np.testing.assert_allclose(ours, raw, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert embed_texts(retriever, [], batch_size=8).shape == (0, 384)


def test_passage_texts_put_the_title_first_once():
    got = passage_texts([{"title": "Paris", "text": "Paris is a city."}, {"title": "Paris", "text": "It is old."}])
    assert got == ["Paris is a city.", "Paris: It is old."]


def test_embed_corpus_writes_a_memory_map(tmp_path, retriever, embedded):
    passages, embeddings = embedded
    texts = passage_texts(passages[:12])
    out = embed_corpus(retriever, texts, batch_size=5, out_path=tmp_path / "emb" / "embeddings.npy")
    assert isinstance(out, np.memmap) and out.shape == (12, 384)
    np.testing.assert_allclose(out, embeddings[:12], atol=1e-5)
    assert [p.name for p in (tmp_path / "emb").iterdir()] == ["embeddings.npy"]  # no temporary left behind


# ---- FAISS round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF8,Flat"])
def test_round_trip_each_passage_finds_itself(tmp_path, retriever, embedded, factory):
    passages, embeddings = embedded
    index_dir, passages_path = save_built(tmp_path, passages, embeddings, factory)
    assert sorted(p.name for p in index_dir.iterdir()) == ["embeddings.npy", "index.faiss", "manifest.json"]

    pidx = PassageIndex.load(index_dir, passages_path, retriever=EMBEDDED_RETRIEVER, expected_dim=384)
    assert len(pidx) == len(passages) and pidx.passages == passages
    assert pidx.manifest["index_factory"] == factory and pidx.manifest["version"] == 0
    np.testing.assert_array_equal(pidx.embeddings, embeddings)

    rows = [0, 17, 101, 160, len(passages) - 1]
    scores, ids = pidx.search_text(retriever, [passages[i]["text"] for i in rows], k=5)  # (5, 5) each
    assert ids.shape == scores.shape == (len(rows), 5)
    assert ids[:, 0].tolist() == rows
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    _, ids = pidx.search(embeddings[::20], k=10)  # (10, 10): a usual k finds a full list everywhere
    assert (ids >= 0).all() and len(set(ids.ravel().tolist())) > 10
    if factory == "Flat":  # exact search with k beyond the index size lists every passage once
        _, all_ids = pidx.search(embeddings[:1], k=10_000)
        assert sorted(all_ids[0].tolist()) == list(range(len(passages)))


def test_too_few_passages_to_train_says_how_many_are_needed(embedded):
    _, embeddings = embedded
    with pytest.raises(CozyError, match=r"index_factory='IVF500,Flat' needs at least 500 passages.*only 200"):
        make_faiss_index(embeddings, "IVF500,Flat")
    with pytest.raises(CozyError, match=r"needs at least 256 passages.*only 200"):
        make_faiss_index(embeddings, "IVF4,PQ8")  # 8-bit PQ codebooks need 256 points


def test_bad_factory_and_no_vectors_are_cozy_errors(embedded):
    _, embeddings = embedded
    with pytest.raises(CozyError, match=r"index_factory='Bogus'.*could not parse"):
        make_faiss_index(embeddings, "Bogus")
    with pytest.raises(CozyError, match=r"index_factory='IVF4,PQ5'.*multiple"):
        make_faiss_index(embeddings, "IVF4,PQ5")  # 384 is not a multiple of 5
    with pytest.raises(CozyError, match="no passage embeddings"):
        make_faiss_index(np.empty((0, 384), np.float32))


# ---- the manifest guard ---------------------------------------------------------------------


@pytest.fixture
def built(tmp_path, embedded):
    passages, embeddings = embedded
    return save_built(tmp_path, passages[:50], embeddings[:50])


def test_refuses_another_retriever(built):
    index_dir, passages_path = built
    with pytest.raises(CozyError) as e:
        PassageIndex.load(index_dir, passages_path, retriever="sentence-transformers/all-mpnet-base-v2")
    msg = str(e.value)
    assert "manifest.json was built for retriever embedded:all-minilm-l6-v2 (dim 384)" in msg
    assert "config asks for sentence-transformers/all-mpnet-base-v2" in msg


def test_refuses_another_dim(built):
    index_dir, passages_path = built
    with pytest.raises(CozyError, match=r"built for dim 384 .* retriever gives dim 768"):
        PassageIndex.load(index_dir, passages_path, expected_dim=768)


def test_refuses_edited_passages(built):
    index_dir, passages_path = built
    before = json.loads((index_dir / "manifest.json").read_text())["passages_sha256"]
    lines = passages_path.read_text().splitlines(keepends=True)
    passages_path.write_text("".join(lines[:3] + [lines[3].replace('"text": "', '"text": "Edited. ')] + lines[4:]))
    with pytest.raises(CozyError) as e:
        PassageIndex.load(index_dir, passages_path, retriever=EMBEDDED_RETRIEVER)
    msg = str(e.value)
    assert f"passages sha256 {before[:12]}" in msg and str(passages_path) in msg
    from cozyrag_lib.index import file_sha256
    assert file_sha256(passages_path)[:12] in msg


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_index_file_is_named(built, damage):
    index_dir, passages_path = built
    path = index_dir / "index.faiss"
    data = path.read_bytes()
    path.write_bytes(b"not a faiss index" * 4 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CozyError, match=r"index\.faiss: cannot read the FAISS index .*rebuild"):
        PassageIndex.load(index_dir, passages_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(CozyError, match=r"manifest\.json: not found; build the index"):
        PassageIndex.load(tmp_path / "index", tmp_path / "passages.jsonl")


# ---- the stage ------------------------------------------------------------------------------


def test_build_index_without_passages(tiny_cfg):
    with pytest.raises(CozyError, match=r"passages\.jsonl: not found; run the chunk stage first"):
        build_index(tiny_cfg)
    write_passages(tiny_cfg.run_dir / "passages.jsonl", [])
    with pytest.raises(CozyError, match=r"passages\.jsonl: empty; run the chunk stage first"):
        build_index(tiny_cfg)


def test_build_index_stores_sentence_vectors_unless_turned_off(tiny_cfg, retriever):
    from cozyrag_lib.retrieval import passage_sentences

    cfg = dataclasses.replace(tiny_cfg, max_articles=40)
    tiny_passages(cfg)
    summary = build_index(cfg)
    pidx = PassageIndex.load(cfg.paths.index, cfg.paths.passages)
    counts = [len(passage_sentences(p["text"])) for p in pidx.passages]
    assert list(np.diff(pidx.sentences.offsets)) == counts and summary["sentences"] == sum(counts) > len(counts)
    last = pidx.passages[-1]
    fresh = embed_texts(retriever, passage_sentences(last["text"]), show_progress=False)
    np.testing.assert_allclose(pidx.sentences.vectors[-counts[-1]:].astype(np.float32), fresh, atol=2e-2)
    assert build_index(dataclasses.replace(cfg, sentence_vectors=False))["sentences"] == 0
    assert not (cfg.paths.index / "sentences.npy").exists()
    assert PassageIndex.load(cfg.paths.index, cfg.paths.passages).sentences is None


def test_cli_without_passages_is_one_error_line(tmp_path, model_cache):
    r = run_cli("index", "--preset=tiny", f"--out_root={tmp_path}", f"--model_cache={model_cache}")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "run the chunk stage first" in lines[0]
    assert "Traceback" not in r.stderr


def tiny_passages(cfg) -> None:
    """passages/passages.jsonl for the tiny preset, from the chunk stage."""
    chunk_corpus(cfg)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, tiny_cfg, retriever):
    """A real 2-process gloo build gives the 1-process embeddings, index and search results."""
    tiny_passages(dataclasses.replace(tiny_cfg, max_articles=80))  # ~100 passages keep the test short
    passages_path = tiny_cfg.paths.passages
    two_root = tmp_path / "two"
    two_passages = RunPaths(two_root / tiny_cfg.run_name).passages
    two_passages.parent.mkdir(parents=True)
    shutil.copy(passages_path, two_passages)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cozyrag_lib", "index", "--preset=tiny", f"--out_root={two_root}",
           f"--model_cache={tiny_cfg.model_cache}", "--device=cpu", "--embed_batch_size=32"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "COZYRAG_DIST_TIMEOUT_MIN": "5"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary, _ = json.JSONDecoder().raw_decode(r.stdout[r.stdout.index("{"):])  # the first rank's summary
    assert summary["world_size"] == 2

    one = build_index(tiny_cfg)  # same passages, one process
    assert one["world_size"] == 1 and one["passages_sha256"] == summary["passages_sha256"]

    two_dir = two_root / tiny_cfg.run_name / "index"
    a = PassageIndex.load(tiny_cfg.run_dir / "index", passages_path, retriever=tiny_cfg.retriever)
    b = PassageIndex.load(two_dir, two_passages, retriever=tiny_cfg.retriever)
    assert len(a) == len(b) == one["passages"]
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
    questions = ["What is anarchism?", "Who was Albert Einstein?", "What are black holes?"]
    questions += [p["text"] for p in a.passages[:: max(1, len(a) // 7)]]
    sa, ia = a.search_text(retriever, questions, k=5)
    sb, ib = b.search_text(retriever, questions, k=5)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, atol=1e-5)
    # the sentence vectors, embedded in two shards, are the one-process ones
    np.testing.assert_array_equal(a.sentences.offsets, b.sentences.offsets)
    np.testing.assert_allclose(a.sentences.vectors.astype(np.float32), b.sentences.vectors.astype(np.float32), atol=2e-3)
    assert json.loads((two_dir / "config.json").read_text())["run_name"] == tiny_cfg.run_name


# ---- the benchmark --------------------------------------------------------------------------


def test_bench_index_reports_one_json_line(tiny_cfg, capsys):
    from cozyrag_lib import bench

    tiny_passages(tiny_cfg)
    args = ["index", "--preset=tiny", f"--out_root={tiny_cfg.out_root}", f"--model_cache={tiny_cfg.model_cache}",
            "--max_passages=24", "--embed_batch_size=4"]
    assert bench.cli(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["passages"] == 24 and result["encode_raw_passages_per_s"] > 0 and result["ratio"] > 0
    assert set(result["index_build_s"]) == {"Flat", "HNSW32", "IVF4,Flat"}
    assert result["recall_at_10_vs_flat"]["Flat"] == 1.0
    assert "embed_bf16_passages_per_s" not in result  # the tiny preset runs fp32
    assert bench.cli(args + ["--precision=bf16"]) == 0  # the index stage's bf16 embedding, beside fp32
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["embed_bf16_passages_per_s"] > 0 and result["bf16_ratio"] > 0
    assert 0.98 < result["bf16_cosine_min"] <= result["bf16_cosine_mean"] <= 1.0001  # close to the fp32 vectors
    with pytest.raises(CozyError, match="unknown benchmark 'nope'"):
        bench.cli(["nope"])


def test_pq_index_trains_without_polysemous_codes():
    """IVF,PQ builds (and skips the slow polysemous training plain search never uses)."""
    import faiss

    x = np.random.default_rng(0).standard_normal((300, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = make_faiss_index(x, "IVF2,PQ8", nprobe=2)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert index.ntotal == 300 and ivf.nprobe == 2 and not ivf.do_polysemous_training
    _, ids = index.search(x[:20], 1)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.8  # 8-byte codes still mostly find the vector itself
