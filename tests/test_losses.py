"""Losses: values against plain references, gradients where a penalty applies (and none where it doesn't),
and the direction a few optimizer steps on each penalty alone move a tiny model."""
from __future__ import annotations

import copy
import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from cozyrag_lib import losses, retriever_losses
from cozyrag_lib.losses import (GeneratorLoss, answer_nll, keyword_overlap_penalty, ngram_repeat_penalty,
                                short_answer_penalty, stopword_token_ids)
from cozyrag_lib.retriever_losses import contrastive_retriever_loss, gold_passage_loss, lm_supervised_retriever_loss

EOS = 0
V = 50


def test_docstring_examples():
    assert doctest.testmod(losses).failed == 0
    assert doctest.testmod(retriever_losses).failed == 0


# --- answer NLL ----------------------------------------------------------------------------------

def test_answer_nll_equals_cross_entropy_on_masked_positions():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, V, requires_grad=True)
    ids = torch.randint(0, V, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    ids[~mask] = -100  # padded ids may be anything
    ref = F.cross_entropy(logits.reshape(-1, V)[mask.reshape(-1)], ids.reshape(-1)[mask.reshape(-1)])
    assert torch.allclose(answer_nll(logits, ids, mask), ref)
    assert answer_nll(logits, ids, torch.zeros_like(mask)).item() == 0.0


# --- n-gram repeat ---------------------------------------------------------------------------------

def brute_force_ngram(logits, ids, mask, n, prefix=None):
    """Enumerate every earlier n-gram by hand; mean -log(1 - p(repeat set)) over positions with a set."""
    probs = logits.softmax(-1)
    values = []
    for b in range(len(ids)):
        pre = [] if prefix is None else prefix[b]
        ans_t = [t for t in range(ids.shape[1]) if mask[b, t]]
        seq = pre + [int(ids[b, t]) for t in ans_t]
        for i, t in enumerate(ans_t):
            k = len(pre) + i  # index of answer position t in seq
            if k < n - 1:
                continue
            ctx = seq[k - n + 1:k]
            repeat = {seq[j + n - 1] for j in range(0, k - n + 1) if seq[j:j + n - 1] == ctx} - {seq[k]}
            if repeat:
                values.append(-torch.log1p(-probs[b, t, sorted(repeat)].sum()))
    return torch.stack(values).mean()


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_ngram_repeat_matches_brute_force(n, with_prefix):
    torch.manual_seed(n)
    B, L, small_v = 3, 9, 4  # a 4-token vocabulary makes many repeats
    logits = torch.randn(B, L, small_v)
    ids = torch.randint(0, small_v, (B, L))
    mask = torch.arange(L)[None] < torch.tensor([[9], [6], [3]])
    ids[~mask] = 1  # padding that would add repeats if it were counted
    prefix = [[0, 1, 2, 3, 1], [2, 2], [3]]
    if with_prefix:
        prefix_ids = torch.tensor([p + [0] * (5 - len(p)) for p in prefix])
        prefix_mask = torch.arange(5)[None] < torch.tensor([[len(p)] for p in prefix])
        got = ngram_repeat_penalty(logits, ids, mask, n=n, prefix_ids=prefix_ids, prefix_mask=prefix_mask)
        ref = brute_force_ngram(logits, ids, mask, n, prefix)
    else:
        got, ref = ngram_repeat_penalty(logits, ids, mask, n=n), brute_force_ngram(logits, ids, mask, n)
    assert torch.allclose(got, ref, atol=1e-6)


def test_ngram_repeat_gradient_only_where_it_applies():
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 9, EOS]])  # at t=6, "7" would repeat "5 6 7"
    mask = torch.ones_like(ids, dtype=torch.bool)
    logits = torch.randn(1, 8, V, requires_grad=True)
    value = ngram_repeat_penalty(logits, ids, mask)
    value.backward()
    assert value.item() > 0
    assert logits.grad[0, 6, 7] > 0  # descent lowers the repeat token's logit
    assert logits.grad[0, 6].abs().sum() > 0
    others = torch.ones(8, dtype=torch.bool)
    others[6] = False
    assert logits.grad[0, others].abs().sum() == 0


@pytest.mark.parametrize("ids", [
    [5, 6, 7, 8, 9, EOS],        # no n-gram can repeat
    [5, 6, 7, 5, 6, 7],          # the only repeat is the gold token itself: never fight the label
    [5, 6, 7, 6, 5, EOS],        # tokens repeat, but no pair of tokens comes twice (n=3 needs one)
])
def test_ngram_repeat_is_zero_without_repeats(ids):
    ids = torch.tensor([ids])
    logits = torch.randn(1, ids.shape[1], V, requires_grad=True)
    value = ngram_repeat_penalty(logits, ids, torch.ones_like(ids, dtype=torch.bool), n=3)
    value.backward()  # still part of the graph
    assert value.item() == 0.0 and logits.grad.abs().sum() == 0


def test_ngram_repeat_ignores_context_by_default():
    prefix = torch.tensor([[5, 6, 7]])  # the context says "5 6 7"; an extractive answer may copy it
    ids = torch.tensor([[5, 6, 8, EOS]])
    logits = torch.randn(1, 4, V)
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert ngram_repeat_penalty(logits, ids, mask).item() == 0.0
    assert ngram_repeat_penalty(logits, ids, mask, prefix_ids=prefix).item() > 0


# --- keyword overlap -------------------------------------------------------------------------------

def test_keyword_overlap_value_gradient_and_gold_exclusion():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, V, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    ids = torch.tensor([[10, 30, 31, EOS], [32, EOS, -100, -100]])  # row 0 reuses question word 10 as gold
    q = torch.tensor([[10, 11, 12], [13, 14, 0]])
    qmask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    probs = logits.softmax(-1)
    ref = torch.stack([probs[0, 0, [11, 12]].sum(),  # gold 10 is excluded at its own position
                       *(probs[0, t, [10, 11, 12]].sum() for t in (1, 2, 3)),
                       *(probs[1, t, [13, 14]].sum() for t in (0, 1))]).mean()
    value = keyword_overlap_penalty(logits, mask, q, qmask, answer_ids=ids)
    assert torch.allclose(value, ref)
    value.backward()
    assert logits.grad[0, 1, 10] > 0 and logits.grad[1, 0, 13] > 0  # descent lowers question tokens
    assert logits.grad[0, 0, 10] < 0  # ...but not a gold token that is a question word
    assert logits.grad[1, 2:].abs().sum() == 0  # padded positions
    # ignore_ids removes keywords
    only_11 = keyword_overlap_penalty(logits[:1], mask[:1], q[:1], qmask[:1], answer_ids=ids[:1], ignore_ids={10, 12})
    assert torch.allclose(only_11, probs[0, :, 11].mean())


def test_keyword_overlap_is_zero_without_keywords():
    logits = torch.randn(1, 3, V, requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    q = torch.tensor([[10, 11]])
    for value in (keyword_overlap_penalty(logits, mask, q, torch.zeros(1, 2, dtype=torch.bool)),
                  keyword_overlap_penalty(logits, mask, q, torch.ones(1, 2, dtype=torch.bool), ignore_ids=[10, 11])):
        value.backward()
        assert value.item() == 0.0 and logits.grad.abs().sum() == 0


# --- short answer ----------------------------------------------------------------------------------

def test_short_answer_value_and_gradient_only_before_min_words():
    torch.manual_seed(0)
    logits = torch.randn(1, 7, V, requires_grad=True)
    ids = torch.tensor([[30, 31, 32, 33, 34, 35, EOS]])
    words = torch.tensor([[0, 1, 1, 2, 3, 4, 5]])  # "30" "31 32" ... : t=0..4 have fewer than 4 words before
    mask = torch.ones_like(ids, dtype=torch.bool)
    p_eos = logits.softmax(-1)[0, :, EOS]
    value = short_answer_penalty(logits, mask, words, EOS, min_words=4, answer_ids=ids)
    assert torch.allclose(value, -torch.log1p(-p_eos[:5]).mean())
    value.backward()
    assert (logits.grad[0, :5, EOS] > 0).all() and logits.grad[0, 5:].abs().sum() == 0
    # without answer_ids the last real position is the gold EOS
    assert torch.allclose(short_answer_penalty(logits, mask, words, EOS, min_words=10), -torch.log1p(-p_eos[:6]).mean())


def test_short_answer_never_fights_a_gold_eos():
    logits = torch.randn(2, 3, V, requires_grad=True)
    ids = torch.tensor([[EOS, 7, 7], [30, 31, EOS]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    words = torch.tensor([[0, 0, 0], [5, 6, 7]])  # row 0: an empty answer (EOS only); row 1: long enough
    value = short_answer_penalty(logits, mask, words, EOS, min_words=4, answer_ids=ids)
    value.backward()
    assert value.item() == 0.0 and logits.grad.abs().sum() == 0


# --- direction: a few optimizer steps on ONE penalty move a tiny GPT-2 the right way ----------------

def tiny_lm(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V, n_positions=64, bos_token_id=1, eos_token_id=EOS)
    return GPT2LMHeadModel(config)


def answer_logits(model, prefix, answer):
    """(B, L, V) logits predicting each answer token: position P-1+t of prefix+answer predicts answer[t]."""
    P, L = prefix.shape[1], answer.shape[1]
    return model(torch.cat([prefix, answer], 1)).logits[:, P - 1:P - 1 + L]


def train_on(model, loss_fn, steps=10, lr=0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def test_ngram_penalty_lowers_the_repeat_token():
    model = tiny_lm()
    prefix = torch.tensor([[1, 2, 3, 4]])
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 9, EOS]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    p_repeat = lambda: answer_logits(model, prefix, ids).softmax(-1)[0, 6, 7].item()  # noqa: E731
    before = p_repeat()
    train_on(model, lambda: ngram_repeat_penalty(answer_logits(model, prefix, ids), ids, mask), lr=5.0)
    assert p_repeat() < 0.5 * before, (before, p_repeat())


def test_keyword_penalty_lowers_question_token_mass():
    model = tiny_lm()
    question = torch.tensor([[10, 11, 12]])
    prefix = torch.tensor([[10, 11, 12, 20, 21]])
    ids = torch.tensor([[30, 31, 32, EOS]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    qmask = torch.ones_like(question, dtype=torch.bool)
    mass = lambda: answer_logits(model, prefix, ids).softmax(-1)[0, :, 10:13].sum(-1).mean().item()  # noqa: E731
    before = mass()
    train_on(model, lambda: keyword_overlap_penalty(answer_logits(model, prefix, ids), mask, question, qmask,
                                                    answer_ids=ids))
    assert mass() < 0.5 * before, (before, mass())


def test_short_answer_penalty_lowers_early_eos():
    model = tiny_lm()
    prefix = torch.tensor([[1, 2, 3]])
    ids = torch.tensor([[30, 31, 32, 33, 34, EOS]])
    words = torch.tensor([[0, 1, 2, 3, 4, 5]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    p_eos = lambda: answer_logits(model, prefix, ids).softmax(-1)[0, :4, EOS].mean().item()  # noqa: E731
    before = p_eos()
    train_on(model, lambda: short_answer_penalty(answer_logits(model, prefix, ids), mask, words, EOS, min_words=4,
                                                 answer_ids=ids), lr=5.0)
    assert p_eos() < 0.5 * before, (before, p_eos())


# --- GeneratorLoss ---------------------------------------------------------------------------------

def make_batch():
    return dict(answer_ids=torch.tensor([[5, 6, 7, 5, 6, 9, EOS], [30, EOS, 0, 0, 0, 0, 0]]),
                answer_mask=torch.tensor([[1] * 7, [1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool),
                prefix_ids=torch.tensor([[1, 2, 3], [4, 5, 0]]),
                prefix_mask=torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool),
                question_ids=torch.tensor([[5, 11], [30, 12]]), question_mask=torch.ones(2, 2, dtype=torch.bool),
                words_before=torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 0, 0, 0, 0, 0]]), eos_id=EOS)


def test_generator_loss_combines_weighted_parts():
    from cozyrag_lib.config import load_config

    cfg = load_config("tiny")
    loss_fn = GeneratorLoss.from_config(cfg, keyword_ignore_ids={11})
    assert loss_fn.get_config_dict() == {
        "ngram_repeat_n": cfg.ngram_repeat_n, "ngram_repeat_weight": cfg.ngram_repeat_weight,
        "keyword_overlap_weight": cfg.keyword_overlap_weight, "short_answer_min_words": cfg.short_answer_min_words,
        "short_answer_weight": cfg.short_answer_weight, "keyword_ignore_ids": 1, "ngram_include_prefix": False}
    batch = make_batch()
    torch.manual_seed(0)
    logits = torch.randn(2, 7, V, requires_grad=True)
    total, parts = loss_fn(logits, batch)
    assert set(parts) == {"lm", "ngram_repeat", "keyword_overlap", "short_answer"}
    assert all(p.ndim == 0 and not p.requires_grad and p.item() > 0 for p in parts.values())
    ids, mask = batch["answer_ids"], batch["answer_mask"]
    expected = (answer_nll(logits, ids, mask) + cfg.ngram_repeat_weight * ngram_repeat_penalty(logits, ids, mask)
                + cfg.keyword_overlap_weight * keyword_overlap_penalty(logits, mask, batch["question_ids"],
                                                                       batch["question_mask"], ids, ignore_ids={11})
                + cfg.short_answer_weight * short_answer_penalty(logits, mask, batch["words_before"], EOS, 4, ids))
    assert torch.allclose(total, expected)
    total.backward()
    assert logits.grad.abs().sum() > 0


def test_answer_nll_on_real_layout_equals_hf_loss(tiny_generator):
    """The answer layout (logits at the position before each answer token) gives the model's own label loss."""
    model, tok = tiny_generator
    examples = [("Q: Who wrote Hamlet?\nContext:\nHamlet is a tragedy by Shakespeare.\nA: ", "William Shakespeare"),
                ("Q: Capital?\nContext:\nParis.\nA: ", "Paris")]
    encoded = [(tok.encode(p, add_special_tokens=False), tok.encode(a, add_special_tokens=False) + [tok.eos_token_id])
               for p, a in examples]
    B, L = len(encoded), max(len(a) for _, a in encoded)
    logits = torch.zeros(B, L, model.config.vocab_size)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    summed_hf_loss = 0.0
    with torch.no_grad():
        for b, (p, a) in enumerate(encoded):
            out = model(torch.tensor([p + a]), labels=torch.tensor([[-100] * len(p) + a]))
            summed_hf_loss += out.loss.item() * len(a)
            logits[b, :len(a)] = out.logits[0, len(p) - 1:len(p) - 1 + len(a)]
            ids[b, :len(a)], mask[b, :len(a)] = torch.tensor(a), True
    assert answer_nll(logits, ids, mask).item() == pytest.approx(summed_hf_loss / mask.sum().item(), rel=1e-5)


def test_stopword_token_ids(tiny_generator):
    _, tok = tiny_generator
    ignore = stopword_token_ids(tok)
    first = lambda text: tok.encode(text, add_special_tokens=False)[0]  # noqa: E731
    assert tok.eos_token_id in ignore and first(" the") in ignore and first("What") in ignore and first("?") in ignore
    assert first(" Shakespeare") not in ignore and first(" Paris") not in ignore


# --- retriever losses ------------------------------------------------------------------------------

def test_contrastive_loss_matches_hand_computed_infonce():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # scores / 0.1 = [[10, 6], [0, 8]]
    ref = (math.log(1 + math.exp(-4)) + math.log(1 + math.exp(-8))) / 2
    assert contrastive_retriever_loss(q, p, temperature=0.1).item() == pytest.approx(ref, rel=1e-5)
    assert gold_passage_loss(q, p).item() == pytest.approx(ref, rel=1e-5)


def test_gold_passage_loss_with_hard_negatives_matches_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    neg = torch.tensor([[[0.8, 0.6]], [[0.0, -1.0]]])  # (B=2, M=1, d)
    # row 0 scores: pos [10, 6], negatives [8, 0]; row 1: pos [0, 8], negatives [6, -10]
    row0 = -10 + math.log(math.exp(10) + math.exp(6) + math.exp(8) + math.exp(0))
    row1 = -8 + math.log(math.exp(0) + math.exp(8) + math.exp(6) + math.exp(-10))
    assert gold_passage_loss(q, pos, neg).item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    # a masked-out negative is the same as no negative
    neg_mask = torch.tensor([[True], [False]])
    row0 = -10 + math.log(math.exp(10) + math.exp(6) + math.exp(8))
    row1 = -8 + math.log(math.exp(0) + math.exp(8) + math.exp(6))
    assert gold_passage_loss(q, pos, neg, negatives_mask=neg_mask).item() == pytest.approx((row0 + row1) / 2, rel=1e-5)


def test_gold_passage_loss_never_pushes_a_question_away_from_its_gold_by_passage_id():
    """Rows 0 and 1 share gold passage 7 (SQuAD: several questions per paragraph); row 2 (gold 9) retrieved
    passage 7 as a hard negative, row 0 retrieved passage 9. No row may count its own gold as a negative."""
    e = torch.eye(3)
    q = F.normalize(torch.stack([e[0] + 0.3 * e[1], e[0] - 0.3 * e[1], e[2]]), dim=1).requires_grad_()
    # every copy of a passage is its own leaf, so the gradient each copy gets can be read
    g7_row0, g7_row1, g9_row2, g9_neg0, g7_neg2 = (e[i].clone().requires_grad_() for i in (0, 0, 2, 2, 0))
    other = F.normalize(e[1] - e[0], dim=0)  # passage 5: a real negative for everyone
    pos, pos_ids = torch.stack([g7_row0, g7_row1, g9_row2]), torch.tensor([7, 7, 9])
    neg = torch.stack([torch.stack([g9_neg0, other]), torch.stack([other, other]), torch.stack([g7_neg2, other])])
    neg_ids = torch.tensor([[9, 5], [5, 5], [7, 5]])

    loss = gold_passage_loss(q, pos, neg, temperature=0.5, pos_ids=pos_ids, negative_ids=neg_ids)
    # by hand: each row's candidates are its gold once plus every column that is not its gold
    cols, ids = torch.cat([pos, neg.reshape(-1, 3)]).detach(), torch.cat([pos_ids, neg_ids.reshape(-1)])
    ref = 0.0
    for i in range(3):
        keep = (ids != pos_ids[i]) | (torch.arange(len(ids)) == i)  # its own gold column, once
        s = q[i].detach() @ cols[keep].T / 0.5
        ref += -(s[int(keep[:i].sum())] - torch.logsumexp(s, 0)) / 3  # the target is column i among those kept
    assert loss.item() == pytest.approx(float(ref), rel=1e-5)

    loss.backward()
    # no copy of passage 7 is pushed away from question 0 or 1: a gradient step never lowers q_i . copy
    for copy_ in (g7_row0, g7_row1, g7_neg2):
        for i in (0, 1):
            assert float(copy_.grad @ q[i].detach()) <= 1e-7
    assert float(g9_neg0.grad @ q[2].detach()) <= 1e-7  # nor passage 9 (row 0's hard negative) from question 2
    step = q.detach() - 0.1 * q.grad
    for i in (0, 1):  # and both questions move toward their shared gold (question 2 already points at its own)
        assert step[i] @ pos[i].detach() / step[i].norm() > q[i].detach() @ pos[i].detach()

    # without ids the same batch pushes the questions away from their own gold: the old behaviour
    q.grad = g7_neg2.grad = None
    gold_passage_loss(q, pos, neg, temperature=0.5).backward()
    assert float(g7_neg2.grad @ q[0].detach()) > 1e-3 and float(g7_neg2.grad @ q[1].detach()) > 1e-3


def test_lm_supervised_loss_equals_kl_and_masks_candidates():
    torch.manual_seed(0)
    scores = torch.randn(3, 4, requires_grad=True)
    logprob = torch.randn(3, 4, requires_grad=True)
    ref = F.kl_div((scores / 0.1).log_softmax(-1), (logprob / 2.0).softmax(-1), reduction="batchmean")
    loss = lm_supervised_retriever_loss(scores, logprob, tau=0.1, target_temperature=2.0)
    assert torch.allclose(loss, ref)
    loss.backward()
    assert logprob.grad is None and scores.grad.abs().sum() > 0  # the target carries no gradient
    # a missing candidate is the same as a dropped column; a row with no candidates is skipped
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    masked = lm_supervised_retriever_loss(scores, logprob, mask=mask)
    keep = [0, 1, 3]
    ref = (lm_supervised_retriever_loss(scores[:1, keep], logprob[:1, keep])
           + lm_supervised_retriever_loss(scores[1:2], logprob[1:2])) / 2
    assert torch.allclose(masked, ref)
    assert lm_supervised_retriever_loss(scores, logprob, mask=torch.zeros_like(mask)).item() == 0.0


def test_lm_supervised_loss_moves_minilm_toward_the_passage_with_the_answer(retriever):
    """Passage A holds the answer but shares few words with the question; B shares many and holds none.
    MiniLM starts out preferring B; a few steps on the LM-supervised loss must close the gap."""
    model = copy.deepcopy(retriever)  # the session fixture stays untouched
    model.eval()  # no dropout: the same inputs give the same scores before and after
    questions = ["Who wrote Pride and Prejudice?", "What is the capital of France?"]
    passages = [["Jane Austen published the novel in 1813; it follows Elizabeth Bennet.",
                 "Pride and Prejudice is a story about pride and about prejudice, themes found in many works."],
                ["Paris is the largest city on the Seine and seat of the national government.",
                 "France is a country in Western Europe with a long history and many regions."]]
    # the generator finds the answer far more likely given A than given B (mean per-token log-prob)
    answer_logprob = torch.tensor([[-0.5, -4.0], [-0.5, -4.0]])

    def scores():  # (B, K=2) cosine similarities, with grad
        texts = questions + [p for pair in passages for p in pair]
        emb = F.normalize(model(model.preprocess(texts))["sentence_embedding"], dim=-1)
        q, p = emb[:2], emb[2:].reshape(2, 2, -1)
        return torch.einsum("bd,bkd->bk", q, p)

    torch.manual_seed(0)
    with torch.no_grad():
        before = scores()
    assert (before[:, 0] <= before[:, 1] + 0.05).all(), before  # the test means something: B starts ahead
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    for _ in range(3):
        opt.zero_grad()
        lm_supervised_retriever_loss(scores(), answer_logprob, tau=0.1).backward()
        opt.step()
    with torch.no_grad():
        after = scores()
    gap_before, gap_after = before[:, 0] - before[:, 1], after[:, 0] - after[:, 1]
    assert (gap_after > gap_before + 0.05).all(), (gap_before, gap_after)
