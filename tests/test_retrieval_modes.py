"""Retrieval modes: the BM25 index (build, save, memory-mapped load, the manifest guard), reciprocal-rank fusion,
`retrieve` following the `retrieval` key from every door (answering, evaluate and its CLI, recall@k, training's
validation), the gold-passage term's ids, and a real 2-process torchrun index build."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

from conftest import ROOT
from cozyrag_lib import CozyError, load_config
from cozyrag_lib.bm25 import Bm25Index, reciprocal_rank_fusion
from cozyrag_lib.embedding import embed_texts, passage_texts
from cozyrag_lib.index import PassageIndex, make_faiss_index
from cozyrag_lib.retrieval import retrieve

PASSAGES = [
    {"id": "a", "title": "Paris", "text": "Paris is the capital and largest city of France, on the Seine."},
    {"id": "b", "title": "Jane Austen", "text": "Jane Austen wrote Pride and Prejudice, a novel published in 1813."},
    {"id": "c", "title": "Running", "text": "Runners ran and were running marathons across the city."},
    {"id": "d", "title": "Mount Everest", "text": "Mount Everest is the highest mountain above sea level."},
    {"id": "e", "title": "Albert Einstein", "text": "Albert Einstein developed the theory of relativity."},
]


@pytest.fixture(scope="module")
def bm25() -> Bm25Index:
    return Bm25Index.build(passage_texts(PASSAGES), "english", passages_sha256="abc")


@pytest.fixture(scope="module")
def pindex(retriever, bm25) -> PassageIndex:
    emb = embed_texts(retriever, passage_texts(PASSAGES), show_progress=False)
    return PassageIndex(index=make_faiss_index(emb), passages=PASSAGES, manifest={"version": 0}, embeddings=emb,
                        bm25=bm25)


# ---- BM25 -----------------------------------------------------------------------------------


def test_bm25_finds_shared_terms_stemmed_and_nothing_for_stop_words(bm25):
    scores, ids = bm25.search(["Who wrote Pride and Prejudice?", "a city that runs", "the of and", "zzzz"], k=3)
    assert ids.shape == scores.shape == (4, 3)
    assert ids[0, 0] == 1 and scores[0, 0] > 0 and ids[0, 1] == -1  # only passage b shares a term
    assert ids[1, :2].tolist() == [2, 0]  # stemmed: "runs" matches "running" (and "city" "city") in c; a has "city"
    assert (ids[2] == -1).all() and (scores[2] == 0).all()  # stop words only: nothing found, not random rows
    assert (ids[3] == -1).all()  # an unknown word
    assert bm25.search(["Paris"], k=50)[1].shape == (1, len(PASSAGES))  # k capped at the corpus size


def test_bm25_round_trips_memory_mapped_and_records_its_settings(tmp_path, bm25):
    saved = bm25.save(tmp_path / "bm25")
    m = json.loads((saved / "manifest.json").read_text())
    assert m["passages"] == len(PASSAGES) and m["passages_sha256"] == "abc"
    assert (m["stemmer"], m["stopwords"], m["lower"], m["k1"], m["b"]) == ("english", "en", True, 0.9, 0.4)
    assert m["bytes"] > 0 and m["token_pattern"]
    loaded = Bm25Index.load(saved, passages_sha256="abc", n_passages=len(PASSAGES), stemmer="english")
    assert isinstance(loaded.model.scores["data"], np.memmap)
    questions = ["capital of France", "theory of relativity", "highest mountain"]
    for a, b in zip(bm25.search(questions, 3), loaded.search(questions, 3)):
        np.testing.assert_array_equal(a, b)


def test_bm25_load_refuses_other_passages_settings_and_damage(tmp_path, bm25):
    saved = bm25.save(tmp_path / "bm25")
    manifest = saved / "manifest.json"
    with pytest.raises(CozyError, match=r"bm25/manifest.json was built for passages sha256 abc.*the passages changed"):
        Bm25Index.load(saved, passages_sha256="def" * 10)
    with pytest.raises(CozyError, match=r"manifest.json was built for 5 passages, but there are 6"):
        Bm25Index.load(saved, n_passages=6)
    with pytest.raises(CozyError, match=r"manifest.json was built for stemmer 'english' \(the config asks for 'none'\)"):
        Bm25Index.load(saved, stemmer="none")
    (saved / "data.csc.index.npy").write_bytes(b"not numpy")
    with pytest.raises(CozyError, match=r"bm25: cannot read the BM25 index .*rebuild it with the index stage"):
        Bm25Index.load(saved)
    manifest.unlink()
    with pytest.raises(CozyError, match=r"bm25/manifest.json: not found .*python -m cozyrag_lib index"):
        Bm25Index.load(saved)
    with pytest.raises(CozyError, match="bm25_stemmer='klingon' is not a Snowball stemmer"):
        Bm25Index.build(["x"], "klingon")


def test_reciprocal_rank_fusion_by_hand():
    dense = np.array([[3, 1, 2, -1], [0, 1, 2, 3]])
    sparse = np.array([[1, 4, -1, -1], [-1, -1, -1, -1]])  # the second question: BM25 found nothing
    scores, ids = reciprocal_rank_fusion([dense, sparse], k=3, rrf_k=60)
    # 1: 1/62 + 1/61 ; 3: 1/61 ; 4: 1/62 (ties with nothing) ; 2: 1/63
    assert ids[0].tolist() == [1, 3, 4]
    np.testing.assert_allclose(scores[0], [1 / 62 + 1 / 61, 1 / 61, 1 / 62], rtol=1e-6)
    assert ids[1].tolist() == [0, 1, 2]  # the dense list alone, in its order
    # a tie goes to the first list's (the dense) order
    _, ids = reciprocal_rank_fusion([np.array([[5, 6]]), np.array([[6, 5]])], k=2)
    assert ids[0].tolist() == [5, 6]


# ---- one key, every door --------------------------------------------------------------------


def test_retrieve_follows_the_index_mode_and_an_explicit_one(retriever, pindex):
    q = ["Who wrote Pride and Prejudice?", "What is the highest mountain?"]
    dense = retrieve(retriever, pindex, q, k=2)
    bm = retrieve(retriever, pindex, q, k=2, mode="bm25")
    hy = retrieve(retriever, pindex, q, k=2, mode="hybrid")
    np.testing.assert_allclose(dense[0], bm[0])  # the question embeddings are there in every mode (sentence ranking)
    assert dense[2][:, 0].tolist() == bm[2][:, 0].tolist() == hy[2][:, 0].tolist() == [1, 3]
    assert (bm[1][:, 0] > 1.0).all() and (hy[1][:, 0] <= 2 / 61 + 1e-6).all()  # BM25 scores, RRF scores
    np.testing.assert_array_equal(retrieve(retriever, pindex.with_retrieval("bm25"), q, k=2)[2], bm[2])
    assert pindex.retrieval == "dense"  # with_retrieval is a view, the original is unchanged
    with pytest.raises(CozyError, match="retrieval must be one of dense, bm25, hybrid"):
        pindex.with_retrieval("sparse")


def test_config_key_checks_and_an_index_without_bm25(retriever, pindex, tmp_path):
    with pytest.raises(CozyError, match="retrieval must be dense, bm25 or hybrid, got 'bm52'"):
        load_config("tiny", retrieval="bm52")
    with pytest.raises(CozyError, match="rrf_k must be positive"):
        load_config("tiny", rrf_k=0)
    cfg = load_config("tiny", retrieval="hybrid", rrf_k=10)
    bare = PassageIndex(index=pindex.index, passages=PASSAGES, manifest={"passages_file": "p.jsonl"})
    with pytest.raises(CozyError, match="bm25/manifest.json: not found"):
        bare.configure(cfg, tmp_path / "index" / "bm25")  # an index built before BM25 support: refused at load
    assert not bare.configure(load_config("tiny"), tmp_path / "index" / "bm25").has_bm25()  # dense needs none


def test_the_index_stage_builds_bm25_and_every_door_follows_the_key(tiny_run, tmp_path, capsys):
    from cozyrag_lib import RAG, read_qa
    from cozyrag_lib import evaluate as ev
    from cozyrag_lib.explore import other_retrievals, recall_curves, retrieval_pipelines

    paths = tiny_run.paths
    m = json.loads((paths.bm25 / "manifest.json").read_text())
    assert m["passages_sha256"] == json.loads((paths.index / "manifest.json").read_text())["passages_sha256"]
    items = read_qa(paths.qa_split("test"))[:4]

    rag = RAG.load(f"base:{tiny_run.run_dir}", retrieval="bm25")  # the key through RAG.load's overrides
    assert rag.pindex.retrieval == "bm25" and rag.pindex.bm25 is not None
    out = rag.answer(items[0]["question"], top_k=3)
    _, want = rag.pindex.bm25.search([items[0]["question"]], 3)
    assert [p["id"] for p in out["passages"]] == [rag.pindex.passages[j]["id"] for j in want[0] if j >= 0]

    summary, preds = ev.evaluate(rag, items, "rag", top_k=3, batch_size=2, show_progress=False)
    assert summary["retrieval"] == "bm25" and summary["passages"] == len(rag.pindex)
    accs = [summary[f"top{k}_accuracy"] for k in (1, 5, 20, 100)]
    assert accs == sorted(accs) and all(f"top{k}_accuracy" in preds[0] for k in (1, 5, 20, 100))

    pipes = retrieval_pipelines(RAG.load(f"base:{tiny_run.run_dir}"), rag.with_retrieval("dense"))
    assert list(pipes) == ["dense-base", "dense-trained", "bm25", "hybrid-trained"]
    # notebook 05 answers once more in the modes the run does not use (quality runs are hybrid)
    assert list(other_retrievals(pipes, rag.with_retrieval("dense"))) == ["bm25", "hybrid-trained"]
    assert list(other_retrievals(pipes, rag.with_retrieval("hybrid"))) == ["dense-trained", "bm25"]
    curves = recall_curves(pipes, items, ks=[1, 5])
    assert [c["retrieval"] for c in curves.values()] == ["dense", "dense", "bm25", "hybrid"]
    assert curves["bm25"]["top5_accuracy"] == pytest.approx(
        ev.recall_at_ks(rag, items, [5])["top_accuracy"][0])  # the same pipeline, the same numbers
    for c in curves.values():
        assert c["top_accuracy"] == sorted(c["top_accuracy"]) and set(c) >= {"top1_accuracy", "top100_accuracy"}

    # the command line: the config key in the one grammar
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(it) + "\n" for it in items))
    assert ev.cli([f"--run=base:{tiny_run.run_dir}", f"--qa={qa}", "--retrieval=hybrid", "--limit=2",
                   "--batch_size=2", f"--out={tmp_path / 'e.json'}"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["retrieval"] == "hybrid" and printed["n"] == 2
    assert json.loads((tmp_path / "e.json").read_text()) == printed
    with pytest.raises(CozyError, match="retrieval must be dense, bm25 or hybrid"):
        ev.cli([f"--run=base:{tiny_run.run_dir}", f"--qa={qa}", "--retrieval=sparse"])


# ---- training: the gold-passage term gets passage ids; validation reports every mode ---------


def test_retriever_loss_masks_a_shared_gold_by_passage_id(retriever, monkeypatch):
    from cozyrag_lib import train_steps

    seen = {}
    real = train_steps.gold_passage_loss

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(train_steps, "gold_passage_loss", spy)
    monkeypatch.setattr(train_steps, "candidate_logprobs", lambda run, q, a, cand: torch.zeros(cand.shape))
    cfg = load_config("tiny", context_tokens=64, batch_size=2)
    run = types.SimpleNamespace(cfg=cfg, device=torch.device("cpu"), retriever=retriever, passage_encoder=retriever,
                                ret_model=train_steps.RetrieverEncoder(retriever), pindex=types.SimpleNamespace(passages=PASSAGES))
    run.autocast = lambda: torch.autocast("cpu", enabled=False)
    batch = {"questions": ["Who wrote Pride and Prejudice?", "When was Pride and Prejudice published?"],
             "answers": ["Jane Austen", "1813"], "gold": [1, 1], "candidates": [[1, 4], [0, 1]]}  # both hold gold 1
    loss, parts = train_steps.retriever_loss(run, batch)
    assert torch.isfinite(loss) and parts["gold_passage"] > 0
    assert seen["pos_ids"].tolist() == [1, 1] and seen["negative_ids"].tolist() == [[1, 4], [0, 1]]


@pytest.mark.slow
def test_training_with_hybrid_reports_every_mode_side_by_side(tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "runs" / "hy"
    for stage in ("qa", "passages", "index"):
        shutil.copytree(tiny_run.run_dir / stage, run_dir / stage)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "cozyrag_lib.train", "--preset=tiny", f"--out_root={tmp_path / 'runs'}",
           "--run_name=hy", f"--model_cache={tiny_run.model_cache}", "--retrieval=hybrid", "--max_steps_per_phase=2",
           "--eval_every=100", "--retriever_candidates=3", "--max_train_qa=16", "--max_val_qa=8", "--max_new_tokens=4",
           "--warmup_steps=1", "--batch_size=4"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "val_loss" in row]
    assert evals
    for row in evals:
        for mode in ("dense", "bm25", "hybrid"):
            for key in ("val_recall@5", "val_top5_accuracy", "val_top20_accuracy"):
                assert 0.0 <= row[f"{key}_{mode}"] <= 1.0
        assert row["val_recall@5"] == row["val_recall@5_hybrid"]  # the run's own mode keeps the old keys
    # BM25 never moves; the refreshed index after the retriever phase left index/bm25 as it was
    assert len({row["val_recall@5_bm25"] for row in evals}) == 1
    assert not (run_dir / "final" / "index" / "bm25").exists()


# ---- torchrun: built once, read on every rank -----------------------------------------------

RANK_SCRIPT = textwrap.dedent('''
    import json, sys
    from cozyrag_lib import bm25, index, load_config
    from cozyrag_lib.models import load_retriever
    from cozyrag_lib.retrieval import retrieve

    out_root, run_name, model_cache, out = sys.argv[1:5]
    builds = []
    real = bm25.Bm25Index.build.__func__
    index.Bm25Index.build = classmethod(lambda cls, *a, **kw: builds.append(1) or real(cls, *a, **kw))
    cfg = load_config("tiny", out_root=out_root, run_name=run_name, model_cache=model_cache, device="cpu",
                      embed_batch_size=32)
    summary = index.build_index(cfg)  # torchrun: every rank embeds its share, rank 0 builds and writes
    import os
    rank = int(os.environ["RANK"])
    retriever = load_retriever(cfg.retriever, device="cpu")
    questions = ["What is anarchism?", "Who was Albert Einstein?", "What are black holes?"]
    got = {}
    for mode in ("dense", "bm25", "hybrid"):
        p = index.PassageIndex.load(cfg.paths.index, cfg.paths.passages, retriever=cfg.retriever)
        p.configure(load_config("tiny", retrieval=mode), cfg.paths.bm25)  # every rank reads index/bm25 itself
        got[mode] = retrieve(retriever, p, questions, 5)[2].tolist()
    json.dump({"rank": rank, "builds": len(builds), "ids": got, "bm25_bytes": summary.get("bm25_bytes")},
              open(f"{out}/rank{rank}.json", "w"))
''')


@pytest.mark.slow
def test_torchrun_builds_bm25_once_and_every_rank_loads_it(tmp_path, tiny_cfg, retriever):
    import dataclasses
    import shutil

    from cozyrag_lib.chunking import chunk_corpus
    from cozyrag_lib.paths import RunPaths

    small = dataclasses.replace(tiny_cfg, max_articles=60)
    chunk_corpus(small)  # ~80 passages keep the test short
    two = RunPaths(tmp_path / "two" / tiny_cfg.run_name)
    two.passages.parent.mkdir(parents=True)
    shutil.copy(small.paths.passages, two.passages)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path / "two"), tiny_cfg.run_name, tiny_cfg.model_cache, str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "COZYRAG_DIST_TIMEOUT_MIN": "5", "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["builds"] for x in ranks] == [1, 0]  # rank 0 built it, rank 1 did not
    assert ranks[0]["bm25_bytes"] == ranks[1]["bm25_bytes"] > 0  # the summary is broadcast
    assert ranks[0]["ids"] == ranks[1]["ids"]  # both ranks read the same index, for each mode
    # and it is the index one process builds
    one = Bm25Index.build(passage_texts(PassageIndex.load(two.index, two.passages).passages), "english")
    _, ids = one.search(["What is anarchism?", "Who was Albert Einstein?", "What are black holes?"], 5)
    assert ranks[0]["ids"]["bm25"] == ids.tolist()
