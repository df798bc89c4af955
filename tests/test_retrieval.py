"""The data path: retrieval, sentence ranking, token budgets, context caching, prompts and batch layout."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from cozyrag_lib.embedding import embed_texts, passage_texts

from cozyrag_lib.index import PassageIndex, make_faiss_index
from cozyrag_lib.retrieval import (DEFAULT_TEMPLATE, SentenceCache, SentenceVectors, build_contexts, collate, encode_example,
                                   fit_context, format_prompt, gold_passages, rank_sentences, retrieve, truncate_tokens,
                                   words_before)

PASSAGES = [
    {"id": "p0", "title": "Paris", "text": "Paris is the capital of France. It hosts the Louvre museum. "
                                           "The Seine flows through Paris."},
    {"id": "p1", "title": "Bananas", "text": "Bananas are yellow fruit. They grow in tropical climates."},
    {"id": "p2", "title": "Mount Everest", "text": "Mount Everest is the highest mountain on Earth. "
                                                   "It lies in the Himalayas on the border of Nepal and China."},
    {"id": "p3", "title": "Albert Einstein", "text": "Albert Einstein was a German-born theoretical physicist. "
                                                     "He developed the theory of relativity. He liked the violin."},
]


@pytest.fixture(scope="module")
def pindex(retriever):
    emb = embed_texts(retriever, passage_texts(PASSAGES), show_progress=False)
    return PassageIndex(index=make_faiss_index(emb), passages=PASSAGES, manifest={"version": 0}, embeddings=emb)


@pytest.fixture(scope="module")
def tok(tiny_generator):
    return tiny_generator[1]


def test_retrieve_finds_the_right_passage_in_batches(retriever, pindex):
    questions = ["What is the capital of France?", "Which is the highest mountain?", "Who developed relativity?"]
    q_emb, scores, ids = retrieve(retriever, pindex, questions, k=2, batch_size=2)  # two FAISS searches
    assert q_emb.shape == (3, 384) and scores.shape == ids.shape == (3, 2)
    assert [PASSAGES[i]["title"] for i in ids[:, 0]] == ["Paris", "Mount Everest", "Albert Einstein"]
    assert np.all(scores[:, 0] >= scores[:, 1])


def test_build_contexts_ranks_sentences_and_keeps_max_sentences(retriever, pindex, tok):
    q = "Which river flows through Paris?"
    q_emb, _, ids = retrieve(retriever, pindex, [q], k=2)
    cache = SentenceCache(retriever)
    [one] = build_contexts(q_emb, ids, PASSAGES, cache, tok, max_sentences=1, context_tokens=100)
    assert one == "The Seine flows through Paris."  # the most similar sentence, not the passage's first
    [two] = build_contexts(q_emb, ids, PASSAGES, cache, tok, max_sentences=2, context_tokens=100)
    assert two.startswith("The Seine flows through Paris. ") and two.count(".") == 2
    # the ranking is by cosine similarity to the question, best first
    ranked = rank_sentences(q_emb[0], [PASSAGES[i]["id"] for i in ids[0]], cache, 10)
    sims = embed_texts(retriever, ranked, show_progress=False) @ q_emb[0]
    assert np.all(np.diff(sims) <= 1e-5)


def test_build_contexts_respects_the_token_budget(retriever, pindex, tok):
    q_emb, _, ids = retrieve(retriever, pindex, ["Tell me about Einstein and Everest"], k=4)
    for budget in (3, 7, 15):
        [ctx] = build_contexts(q_emb, ids, PASSAGES, SentenceCache(retriever), tok, max_sentences=10, context_tokens=budget)
        n = len(tok(ctx, add_special_tokens=False)["input_ids"])
        assert 0 < n <= budget


def test_passage_order_keeps_the_kept_sentences_in_reading_order(retriever, pindex, tok):
    """context_order "passage": the same sentences as "relevance" (the best ones that fit the budget), put in
    retrieval then reading order, so a pronoun follows its subject."""
    q_emb, _, ids = retrieve(retriever, pindex, ["Which river flows through Paris?"], k=2)
    cache = SentenceCache(retriever)
    [best] = build_contexts(q_emb, ids, PASSAGES, cache, tok, max_sentences=2, context_tokens=100)
    [read] = build_contexts(q_emb, ids, PASSAGES, cache, tok, max_sentences=2, context_tokens=100, order="passage")
    assert best == "The Seine flows through Paris. Paris is the capital of France."  # best first
    assert read == "Paris is the capital of France. The Seine flows through Paris."  # Paris's passage, in its order
    # the budget chooses by relevance first: the best sentence survives a cut that the passage order would make
    budget = len(tok("The Seine flows through Paris.", add_special_tokens=False)["input_ids"])
    [cut] = build_contexts(q_emb, ids, PASSAGES, cache, tok, max_sentences=3, context_tokens=budget, order="passage")
    assert cut == "The Seine flows through Paris."


def test_fit_context_puts_the_cut_sentence_where_it_stood(tok):
    ranked = ["The Seine flows through Paris.", "Paris is the capital of France.", "It hosts the Louvre museum."]
    reading = ["Paris is the capital of France.", "It hosts the Louvre museum.", "The Seine flows through Paris."]
    assert fit_context(tok, ranked, 100) == " ".join(ranked)
    assert fit_context(tok, ranked, 100, reading) == " ".join(reading)
    n = len(tok(" ".join(ranked[:2]) + " It hosts", add_special_tokens=False)["input_ids"])
    cut = fit_context(tok, ranked, n, reading)  # the third sentence cut after "It hosts"
    assert cut.startswith("Paris is the capital of France. It hosts") and cut.endswith("The Seine flows through Paris.")
    assert "Louvre" not in cut and len(tok(cut, add_special_tokens=False)["input_ids"]) <= n


def test_sentence_cache_encodes_each_passage_once(retriever, pindex, tok):
    cache = SentenceCache(retriever)
    q_emb, _, ids = retrieve(retriever, pindex, ["capital of France", "Louvre"], k=2)
    build_contexts(q_emb, ids, PASSAGES, cache, tok, 4, 64)
    first = cache.encoded
    assert first > 0
    build_contexts(q_emb, ids, PASSAGES, cache, tok, 4, 64)
    assert cache.encoded == first  # nothing re-encoded
    cache.reset(version=1)
    build_contexts(q_emb, ids, PASSAGES, cache, tok, 4, 64)
    assert cache.encoded == 2 * first


def test_stored_sentence_vectors_give_the_contexts_encoding_gives(retriever, pindex, tok):
    overlap = {"id": "p4", "title": "Paris", "text": "The Seine flows through Paris. Paris has many bridges."}
    passages = PASSAGES + [overlap]  # a sentence repeated across passages (chunk overlap) is embedded once
    stored = SentenceVectors.embed(retriever, passages, batch_size=4)
    assert len(stored) == 5 and list(np.diff(stored.offsets)) == [3, 2, 2, 3, 2]
    assert stored.vectors.dtype == np.float16 and stored.vectors.shape == (12, 384)
    fresh = embed_texts(retriever, ["The Seine flows through Paris.", "They grow in tropical climates."],
                        show_progress=False)
    assert np.allclose(stored.vectors[[2, 4]].astype(np.float32), fresh, atol=2e-3)
    assert np.array_equal(stored.vectors[2], stored.vectors[10])  # p0's third sentence is p4's first

    questions = ["Which river flows through Paris?", "Who developed relativity?", "Where is Everest?"]
    q_emb, _, ids = retrieve(retriever, pindex, questions, k=3)
    plain, reading = SentenceCache(retriever), SentenceCache(retriever, stored=(stored, passages))
    want = build_contexts(q_emb, ids, PASSAGES, plain, tok, 3, 64)
    assert build_contexts(q_emb, ids, PASSAGES, reading, tok, 3, 64) == want
    assert plain.encoded > 0 and reading.encoded == 0 and reading.reused == plain.encoded
    # a passage the store does not hold (an oracle context, another text under a known id) is encoded
    reading.add([{"id": "gold-0", "title": "", "text": "A gold passage. Two sentences."},
                 {"id": "p1", "title": "Bananas", "text": "Edited text."}])
    assert reading.encoded == 2
    # a new retriever version leaves the store behind; the version it was made for keeps it
    reading.reset(0)
    assert reading.stored is not None
    reading.reset(1)
    build_contexts(q_emb, ids, PASSAGES, reading, tok, 3, 64)
    assert reading.stored is None and reading.encoded == 2 + plain.encoded


def test_index_sentence_vectors_round_trip_and_mismatches_are_refused(retriever, tmp_path):
    from cozyrag_lib.errors import CozyError
    from cozyrag_lib.index import SENTENCE_OFFSETS_FILE, SENTENCES_FILE, make_manifest, save_index
    from cozyrag_lib.jsonio import write_jsonl

    passages_path = tmp_path / "passages.jsonl"
    write_jsonl(passages_path, PASSAGES)
    emb = embed_texts(retriever, passage_texts(PASSAGES), show_progress=False)
    manifest = make_manifest("embedded:all-minilm-l6-v2", 384, passages_path, len(PASSAGES))
    stored = SentenceVectors.embed(retriever, PASSAGES)
    save_index(tmp_path / "index", make_faiss_index(emb), emb, manifest, sentences=stored)
    loaded = PassageIndex.load(tmp_path / "index", passages_path)
    assert np.array_equal(loaded.sentences.offsets, stored.offsets)
    assert np.array_equal(loaded.sentences.vectors, stored.vectors)
    assert loaded.sentence_store()[1] is loaded.passages
    save_index(tmp_path / "bare", make_faiss_index(emb), emb, manifest)
    assert PassageIndex.load(tmp_path / "bare", passages_path).sentence_store() is None
    np.save(tmp_path / "index" / SENTENCE_OFFSETS_FILE, stored.offsets[:-1])  # offsets for one passage fewer
    with pytest.raises(CozyError, match=f"{SENTENCES_FILE}: .* do not fit an index of 4 passages"):
        PassageIndex.load(tmp_path / "index", passages_path)


def test_truncate_tokens(tok):
    text = "one two three four five six"
    assert truncate_tokens(tok, text, 100) == text
    cut = truncate_tokens(tok, text, 3)
    assert text.startswith(cut) and len(tok(cut, add_special_tokens=False)["input_ids"]) <= 3
    assert truncate_tokens(tok, text, 0) == ""


def test_prompt_formats(tok):
    assert format_prompt(tok, "Who?", "Ann wrote it.") == "Q: Who?\nContext:\nAnn wrote it.\nA: "
    assert format_prompt(tok, "Who?", "ctx", "{context} | {question} =") == "ctx | Who? ="
    chat = format_prompt(tok, "Who wrote it?", "Ann wrote it.", "chat")
    assert "Who wrote it?" in chat and "Ann wrote it." in chat and chat.rstrip().endswith("assistant")


def test_words_before_counts_complete_words(tok):
    ids = tok("New York City", add_special_tokens=False)["input_ids"]
    wb = words_before(tok, ids)
    assert len(wb) == len(ids) + 1 and wb[0] == 0 and wb[-1] == 3
    assert wb == sorted(wb)


def test_example_layout_labels_only_the_answer_and_eos(tok):
    ex = encode_example(tok, "Who wrote it?", "Ann wrote it.", "Ann", DEFAULT_TEMPLATE, max_length=64)
    prompt = tok(format_prompt(tok, "Who wrote it?", "Ann wrote it."))["input_ids"]
    assert ex["prompt_ids"] == prompt
    assert ex["answer_ids"] == tok("Ann", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ex2 = encode_example(tok, "A longer question here?", "ctx " * 40, "Bob Smith", DEFAULT_TEMPLATE, max_length=64)
    b = collate([ex, ex2], tok.pad_token_id, tok.eos_token_id)
    T = max(len(e["prompt_ids"]) + len(e["answer_ids"]) for e in (ex, ex2))
    assert b["input_ids"].shape == (2, T)  # dynamic padding: the longest in the batch
    for row, e in enumerate((ex, ex2)):
        n, L = len(e["prompt_ids"]), len(e["answer_ids"])
        # the hidden state at position t predicts token t + 1: positions point one before each answer token
        assert b["positions"][row, :L].tolist() == list(range(n - 1, n - 1 + L))
        assert b["input_ids"][row, b["positions"][row, :L] + 1].tolist() == e["answer_ids"]
        assert b["answer_mask"][row].sum() == L and b["attention_mask"][row].sum() == n + L
    # the prompt is cut in the context, never past max_length
    assert len(ex2["prompt_ids"]) + len(ex2["answer_ids"]) <= 64 and "A longer question here?" in tok.decode(ex2["prompt_ids"])


def test_gold_passages_by_title_and_context():
    passages = [{"title": "Rome", "text": "Rome is old."}, {"title": "Paris", "text": "Paris is big. It has a tower."},
                {"title": "Paris", "text": "The Seine is a river in Paris."}]
    items = [{"title": "Paris", "answers": ["x"]},
             {"title": "Paris", "answers": ["Seine"], "context": "The Seine is a river in Paris, a big city."},
             {"title": "Berlin", "answers": ["y"]}, {"answers": ["z"], "question": "?"}]
    assert gold_passages(items, passages) == [1, 2, -1, -1]


def test_contexts_are_cached_per_retriever_and_index_version(retriever, pindex, tok, monkeypatch):
    from cozyrag_lib import train_data

    calls = []
    real = train_data.retrieve
    monkeypatch.setattr(train_data, "retrieve", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    class FakeRun(types.SimpleNamespace):  # the parts of train_state.Run that contexts_for uses
        versions = property(lambda self: (self.state["retriever_version"], self.state["index_version"]))

        def autocast(self):
            return torch.autocast("cpu", enabled=False)

    cfg = types.SimpleNamespace(top_k=2, embed_batch_size=8, context_tokens=32, context_order="relevance", query_only=False)
    state = {"retriever_version": 0, "index_version": 0}
    run = FakeRun(cfg=cfg, retriever=retriever, pindex=pindex, tokenizer=tok, context_cache={},
                  sentence_cache=SentenceCache(retriever), state=state)
    items = [{"id": "a", "question": "capital of France"}, {"id": "b", "question": "highest mountain"}]
    first = train_data.contexts_for(run, items, 3)
    assert calls == [2]
    assert train_data.contexts_for(run, items, 3) == first and calls == [2]  # cached: no retrieval
    train_data.contexts_for(run, items + [{"id": "c", "question": "violin"}], 3)
    assert calls == [2, 1]  # only the new question
    state["index_version"] = 1  # a refreshed index invalidates the cache
    train_data.contexts_for(run, items, 3)
    assert calls == [2, 1, 2]
