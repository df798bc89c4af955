"""The index refresh after a retriever phase (`refresh`: full, retrieved, none) and `bench refresh`, on a tiny run
whose retriever is moved by a seeded perturbation (a stand-in for a retriever phase)."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_stages
from cozyrag_lib import bench, train, train_eval
from cozyrag_lib.chunking import read_passages
from cozyrag_lib.config import Config, load_config
from cozyrag_lib.embedding import embed_corpus, embed_texts, passage_texts
from cozyrag_lib.errors import CozyError
from cozyrag_lib.retrieval import passage_sentences
from cozyrag_lib.train_setup import load_passage_index, setup_run
from cozyrag_lib.train_state import TrainState

STAGE_ARGS = dict(max_articles=80, chunk_max_tokens=64)  # a small corpus: every test here stays fast


def perturbed(model, scale: float = 0.05, seed: int = 0):
    """`model` with every weight multiplied by (1 + scale * noise), seeded: a retriever that moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_cache, retriever):
    """A tiny run with stages 1-3 and a final/retriever (the perturbed base retriever), as `bench refresh` reads it."""
    cfg = tiny_stages(tmp_path_factory.mktemp("refresh") / "runs", model_cache, **STAGE_ARGS)
    perturbed(copy.deepcopy(retriever)).save(str(cfg.paths.final_retriever))
    return cfg


@pytest.fixture(scope="module")
def base_run(trained):
    """A training Run (tiny generator, the base retriever perturbed as in `trained`) set up by training's own code."""
    cfg = load_config("tiny", out_root=trained.out_root, run_name=trained.run_name, model_cache=trained.model_cache,
                      **STAGE_ARGS)
    run = setup_run(cfg, torch.device("cpu"), resume=False)
    perturbed(run.retriever)
    yield run
    run.log.close()


@pytest.fixture
def run(base_run):
    """`base_run` with the stage-3 index and position afresh (each test refreshes it its own way)."""
    base_run.pindex = load_passage_index(base_run.cfg, base_run.retriever, None)
    base_run.state = TrainState.starting_at(int(base_run.pindex.manifest.get("version", 0)))
    base_run.val_cache, base_run.context_cache = {}, {}
    return base_run


def faiss_rows(index) -> np.ndarray:
    return index.reconstruct_n(0, index.ntotal)  # (N, d): what a Flat index searches


# ----------------------------------------------------------------------------------------------
# training's refresh


def test_retrieved_refresh_reembeds_only_the_chosen_rows(run):
    cfg, pidx = run.cfg, run.pindex
    cfg.refresh, cfg.refresh_top_n = "retrieved", 2
    before = np.array(pidx.embeddings, dtype=np.float32)  # (N, d), a copy
    n = len(before)
    questions, gold = train_eval.refresh_targets(cfg, run.items, run.gold, run.val_items, pidx.passages)
    assert len(questions) == len(run.items) + len(run.val_items) + len(cfg.val_questions) and gold
    rows = train_eval.refresh_rows(run.retriever, pidx, questions, gold, 2, cfg.embed_batch_size)
    # the union of each question's top 2 (new query encoder, stale index) and the gold rows
    _, top = pidx.search(embed_texts(run.retriever, questions, show_progress=False), 2)
    assert set(rows.tolist()) == set(top.ravel().tolist()) | set(gold)
    assert 0 < len(rows) < n and np.all(np.diff(rows) > 0)

    out = train_eval.refresh_index(run)
    assert out["refresh"] == "retrieved" and out["refresh_passages"] == len(rows) and out["refresh_s"] > 0
    after = pidx.embeddings
    others = np.setdiff1d(np.arange(n), rows)
    assert np.array_equal(after[others], before[others])  # bit for bit
    fresh = embed_texts(run.retriever, passage_texts([pidx.passages[i] for i in rows]), show_progress=False)
    np.testing.assert_allclose(after[rows], fresh, atol=1e-5)
    assert np.abs(after[rows] - before[rows]).max() > 1e-3  # the retriever moved: those rows did too
    assert run.state.index_version == run.state.initial_index_version + 1
    np.testing.assert_array_equal(faiss_rows(pidx.index), after)  # the index is rebuilt from the updated matrix


def test_full_refresh_is_todays_refresh(run):
    cfg, pidx = run.cfg, run.pindex
    cfg.refresh = "full"
    out = train_eval.refresh_index(run)
    expected = embed_corpus(run.retriever, passage_texts(pidx.passages), cfg.embed_batch_size)
    assert out["refresh"] == "full" and out["refresh_passages"] == len(pidx.passages) and out["refresh_s"] > 0
    np.testing.assert_allclose(pidx.embeddings, expected, atol=1e-6)
    np.testing.assert_array_equal(faiss_rows(pidx.index), pidx.embeddings)
    assert run.state.index_version == run.state.initial_index_version + 1


def test_no_refresh_leaves_the_index_and_the_metrics_row_says_so(run):
    cfg, pidx = run.cfg, run.pindex
    cfg.refresh = "none"
    index, emb, version = pidx.index, pidx.embeddings, run.state.index_version
    staleness = train_eval.stale_recall(run)  # the phase end of train.train_loop
    staleness.update(train_eval.refresh_index(run))
    assert pidx.index is index and pidx.embeddings is emb and run.state.index_version == version
    train_eval.log_eval(run, staleness)
    row = json.loads(cfg.paths.metrics.read_text().splitlines()[-1])
    assert (row["refresh"], row["refresh_passages"], row["refresh_s"]) == ("none", 0, 0.0)
    assert row["index_version"] == version and row["val_recall@5_stale"] == row["val_recall@5"]


def test_bad_refresh_values_are_one_line_errors(capsys):
    assert (Config().refresh, Config().refresh_top_n) == ("full", 20)
    for key, value in (("refresh", "partial"), ("refresh_top_n", 0)):
        with pytest.raises(CozyError) as e:
            load_config("tiny", **{key: value})
        assert str(e.value).startswith(f"config: {key} must") and "\n" not in str(e.value)
    assert train.main(["--preset=tiny", "--refresh=sometimes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refresh must be full, retrieved or none" in err[0], err


# ----------------------------------------------------------------------------------------------
# bench refresh


def run_bench(capsys, *args: str) -> dict:
    assert bench.cli(list(args)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def run_args(cfg, name: str | None = None) -> list[str]:
    return ["--preset=tiny", f"--out_root={cfg.out_root}", f"--run_name={name or cfg.run_name}",
            f"--model_cache={cfg.model_cache}"]


def test_bench_refresh_compares_the_strategies(trained, capsys):
    r = run_bench(capsys, "refresh", *run_args(trained), "--top_n=2", "--rerank_n=10", "--threads=1")
    assert r["benchmark"] == "refresh" and r["mode"] == "run" and r["top_n"] == 2 and r["k"] == 5
    s = r["strategies"]
    assert set(s) == {"stale", "full", "retrieved", "rerank"}
    for name, row in s.items():
        for split in ("val", "test"):
            r1, r5 = row[f"{split}_recall@1"], row[f"{split}_recall@5"]
            assert 0 <= r1 <= r5 <= 1, (name, split)
        assert row["seconds"] >= 0
    n = r["passages"]
    assert s["stale"]["passages_embedded"] == 0 and s["full"]["passages_embedded"] == n
    assert 0 < s["retrieved"]["passages_embedded"] < n and s["full"]["seconds"] > 0
    assert 0 < s["rerank"]["passages_embedded"] <= 10 * s["rerank"]["questions"]
    assert r["val_questions"] > 0 and r["test_questions"] > 0


def test_bench_refresh_needs_a_trained_run(trained):
    untrained = trained.run_dir.parent / "untrained"
    for stage in ("qa", "passages", "index"):
        shutil.copytree(trained.run_dir / stage, untrained / stage)
    with pytest.raises(CozyError, match=r"final/retriever not found; train the run first") as e:
        bench.cli(["refresh", *run_args(trained, "untrained")])
    assert "\n" not in str(e.value)


def test_bench_refresh_at_scale(trained, capsys):
    r = run_bench(capsys, "refresh", *run_args(trained), "--n=20000", "--sample=50", "--questions=200",
                  "--top_n=5", "--threads=1")
    assert r["mode"] == "scale" and r["n"] == 20000 and r["sample"] == 50 and r["questions"] == 200
    assert 0 < r["retrieved_passages"] <= 200 * 5 and r["retrieved_share"] == pytest.approx(r["retrieved_passages"] / 20000, abs=1e-5)
    assert r["embeddings_bytes"] == r["index_bytes"] == 20000 * 384 * 4
    for key in ("embed_passages_per_s", "questions_per_s", "flat_build_s", "search_s", "rebuild_s", "rss_bytes",
                "full_embed_s_extrapolated", "full_refresh_s_extrapolated", "retrieved_refresh_s_extrapolated"):
        assert r[key] > 0, key
    assert r["full_embed_s_extrapolated"] == pytest.approx(20000 / r["embed_passages_per_s"], rel=0.01)


@pytest.mark.slow
def test_final_sentence_vectors_belong_to_the_saved_retriever(run):
    """save_final after the retriever moved with no context built since (a plan ending in a retriever phase,
    without validation questions): final/index holds the saved retriever's sentence vectors, not stage 3's."""
    from cozyrag_lib.checkpoint import save_final
    from cozyrag_lib.index import PassageIndex
    from cozyrag_lib.models import load_retriever
    from cozyrag_lib.retrieval import SentenceCache

    cfg = dataclasses.replace(run.cfg, run_name="stale_sentences")
    stale = dataclasses.replace(run, cfg=cfg, state=TrainState(ret_step=1), log=None,
                                sentence_cache=SentenceCache(run.passage_encoder, version=0,
                                                             stored=run.pindex.sentence_store()))
    save_final(stale)
    stage3 = np.load(run.cfg.paths.index / "sentences.npy")
    final = PassageIndex.load(cfg.paths.final_index, run.cfg.paths.passages).sentences.vectors
    assert final.shape == stage3.shape and not np.array_equal(final, stage3)
    first = passage_sentences(read_passages(run.cfg.paths.passages)[0]["text"])
    fresh = embed_texts(load_retriever(str(cfg.paths.final_retriever), "cpu"), first, show_progress=False)
    assert np.all(np.sum(final[:len(first)].astype(np.float32) * fresh, axis=1) > 0.99)


def test_training_with_retrieved_refresh_logs_it_and_checkpoints_the_vectors(trained):
    """A real run (retriever phase, then generator): the refresh row, and the checkpoint a resume starts from."""
    import subprocess
    import sys

    from conftest import ROOT
    from cozyrag_lib.checkpoint import find_checkpoint
    from cozyrag_lib.index import PassageIndex
    from cozyrag_lib.models import load_retriever

    name = "retrieved"
    for stage in ("qa", "passages", "index"):
        shutil.copytree(trained.run_dir / stage, trained.run_dir.parent / name / stage)
    args = [sys.executable, "-m", "cozyrag_lib.train", *run_args(trained, name), "--phases=retriever,generator",
            "--max_steps_per_phase=2", "--eval_every=100", "--checkpoint_every=100", "--retriever_candidates=3",
            "--max_train_qa=16", "--max_val_qa=4", "--max_new_tokens=2", "--warmup_steps=1", "--refresh=retrieved",
            "--refresh_top_n=2", "--val_questions=What is anarchism?"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    cfg = load_config("tiny", out_root=trained.out_root, run_name=name, model_cache=trained.model_cache)
    rows = [json.loads(line) for line in cfg.paths.metrics.read_text().splitlines()]
    [after] = [row for row in rows if "refresh" in row]
    stage3 = np.load(cfg.paths.index / "embeddings.npy")
    assert after["refresh"] == "retrieved" and 0 < after["refresh_passages"] < len(stage3)
    assert after["index_version"] == 1 and after["refresh_s"] > 0 and "val_recall@5_stale" in after
    final = np.load(cfg.paths.final_index / "embeddings.npy")
    assert int((final != stage3).any(axis=1).sum()) == after["refresh_passages"]  # only those rows moved
    # the final index's sentence vectors are the trained retriever's, not stage 3's
    final_sentences = PassageIndex.load(cfg.paths.final_index, cfg.paths.passages).sentences
    stage3_sentences = np.load(cfg.paths.index / "sentences.npy")
    assert final_sentences.vectors.shape == stage3_sentences.shape and not np.array_equal(final_sentences.vectors, stage3_sentences)
    first = passage_sentences(read_passages(cfg.paths.passages)[0]["text"])
    fresh = embed_texts(load_retriever(str(cfg.paths.final_retriever), "cpu"), first, show_progress=False)
    stored = final_sentences.vectors[:len(first)].astype(np.float32)
    assert np.all(np.sum(stored * fresh, axis=1) > 0.99)  # cosine: stored under bf16 where the CPU is fast at it
    # the checkpoint keeps the refreshed vectors, and a resume loads them
    ckpt = find_checkpoint(cfg.paths)
    assert np.array_equal(np.load(ckpt / "embeddings.npy"), final)
    pidx = load_passage_index(cfg, load_retriever(str(ckpt / "retriever"), "cpu"), ckpt)
    assert np.array_equal(pidx.embeddings, final) and pidx.index.ntotal == len(final)
    assert PassageIndex.load(cfg.paths.final_index, cfg.paths.passages).manifest["version"] == 1
