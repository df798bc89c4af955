"""The generator's losses: the answer likelihood and its three differentiable penalties.

Generator. The training loop computes LM-head logits only at answer positions and passes a padded
answer layout (row b of every tensor is one question):

    logits        (B, L, V)  logits predicting answer token t (from the hidden state just before it)
    answer_ids    (B, L)     gold answer tokens, ending with EOS; padded positions hold any id
    answer_mask   (B, L)     True on real answer positions (EOS included)
    prefix_ids    (B, P)     prompt tokens before the answer (question + context), with prefix_mask
    question_ids  (B, Q)     the question's tokens, with question_mask
    words_before  (B, L)     complete words of the gold answer before position t

`answer_nll` is the usual cross-entropy. The three penalties are differentiable functions of the
model's distribution at each answer position (a penalty computed from argmax tokens has no gradient
and trains nothing), and each does what its name says:

    ngram_repeat_penalty     unlikelihood of tokens that would repeat an n-gram of the answer
    keyword_overlap_penalty  probability mass spent on parroting the question's tokens
    short_answer_penalty     probability of stopping (EOS) before the answer has `min_words` words

Every loss returns a scalar: the mean over the positions it applies to, or a zero that still
belongs to the graph (`logits.sum() * 0`) when none does, so `loss.backward()` always works.
`GeneratorLoss` combines them with the config's weights. The retriever's losses are in
`retriever_losses.py`.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# p is clamped below 1 before log(1 - p): a penalty never exceeds -log(1e-6) ~ 13.8 and never is inf.
_MAX_P = 1.0 - 1e-6

# Question words that carry no topic: keyword_overlap_penalty ignores them (see stopword_token_ids).
STOPWORDS = (
    "a an the of in on at to for from by with about as into and or but not no is are was were be been being "
    "do does did done has have had can could will would shall should may might must this that these those "
    "it its he she they them his her their we you your i me my what which who whom whose when where why how "
    "there here than then so if also only very much many some any all each one s"
).split()
PUNCTUATION = list("?.,;:!'\"()-")


def zero_loss(logits: Tensor) -> Tensor:
    """A scalar 0 still attached to the graph, so backward() works when no position applies."""
    return logits.sum() * 0.0


def _neg_log_one_minus(p: Tensor) -> Tensor:
    """-log(1 - p), with p clamped below 1 so the value and its gradient stay finite."""
    return -torch.log1p(-p.clamp(min=0.0, max=_MAX_P))


def answer_nll(logits: Tensor, answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Token-level cross-entropy of the gold answer (EOS included), mean over real answer positions.

    Args:
        logits: (B, L, V) logits predicting answer token t.
        answer_ids: (B, L) gold answer tokens; padded positions may hold any id (even -100).
        answer_mask: (B, L) bool, True on real answer positions.

    Example:
        >>> logits = torch.zeros(1, 2, 5)  # uniform over 5 tokens
        >>> round(answer_nll(logits, torch.tensor([[1, 4]]), torch.tensor([[True, True]])).item(), 4)  # log(5)
        1.6094
    """
    if not answer_mask.any():
        return zero_loss(logits)
    return F.cross_entropy(logits[answer_mask].float(), answer_ids[answer_mask])  # (N, V) vs (N,)


def repeat_token_index(answer_ids: Tensor, answer_mask: Tensor, n: int = 3, prefix_ids: Tensor | None = None,
                       prefix_mask: Tensor | None = None) -> Tensor:
    """(K, 3) long rows (b, t, v): token v at answer position t of row b would complete an n-gram seen before.

    The n-gram is the last n-1 gold tokens before t followed by v. "Seen before" means it occurs in
    the gold answer before position t (and in the prefix, when prefix_ids is given). A gold token is
    never listed at its own position: a gold answer may repeat itself ("New York, New York") and the
    penalty must not fight the label.

    >>> repeat_token_index(torch.tensor([[5, 6, 7, 5, 6, 9, 0]]), torch.ones(1, 7, dtype=torch.bool)).tolist()
    [[0, 5, 7]]
    """
    B, L = answer_ids.shape
    answers, masks = answer_ids.tolist(), answer_mask.tolist()
    rows: list[tuple[int, int, int]] = []
    for b in range(B):
        seq: list[int] = []  # gold tokens so far (prefix, then answer)
        seen: dict[tuple[int, ...], set[int]] = defaultdict(set)  # (n-1)-gram -> tokens that followed it
        if prefix_ids is not None:
            pre = prefix_ids[b] if prefix_mask is None else prefix_ids[b][prefix_mask[b]]
            for tok in pre.tolist():
                if len(seq) >= n - 1:
                    seen[tuple(seq[len(seq) - (n - 1):])].add(tok)
                seq.append(tok)
        for t in range(L):
            if not masks[b][t]:
                continue
            gold = answers[b][t]
            if len(seq) >= n - 1:
                ctx = tuple(seq[len(seq) - (n - 1):])
                rows.extend((b, t, v) for v in sorted(seen.get(ctx, ())) if v != gold)
                seen[ctx].add(gold)  # recorded after scoring t: only *earlier* n-grams count
            seq.append(gold)
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)


def ngram_repeat_penalty(logits: Tensor, answer_ids: Tensor, answer_mask: Tensor, n: int = 3,
                         prefix_ids: Tensor | None = None, prefix_mask: Tensor | None = None) -> Tensor:
    """Unlikelihood of repeating an n-gram: mean of -log(1 - p(repeat tokens)) over positions that have any.

    At answer position t the "repeat tokens" are those that would complete an n-gram (the last n-1
    gold tokens + the candidate) that already occurred earlier (see `repeat_token_index`). The gold
    token at t is never among them, so a gold answer that repeats itself is not fought.

    History: by default only the answer's own earlier tokens. Copying a phrase from the context is
    what an extractive answer should do, so context n-grams are not penalised unless prefix_ids is
    given (then the prompt's n-grams count as history too, and the n-1 context may reach back into it).

    Args:
        logits: (B, L, V) logits predicting answer token t.
        answer_ids: (B, L) gold answer tokens (EOS included).
        answer_mask: (B, L) bool, True on real answer positions.
        n: n-gram length; n=1 penalises any token already in the answer.
        prefix_ids: (B, P) prompt tokens before the answer, or None (answer-only history).
        prefix_mask: (B, P) bool, True on real prompt tokens (None: all real).

    Example:
        >>> ids = torch.tensor([[5, 6, 7, 5, 6, 9, 0]])  # "5 6 7 5 6" -> "7" would repeat "5 6 7"
        >>> mask = torch.ones(1, 7, dtype=torch.bool)
        >>> logits = torch.zeros(1, 7, 10, requires_grad=True)  # p(7) = 0.1 everywhere
        >>> round(ngram_repeat_penalty(logits, ids, mask).item(), 4)  # -log(1 - 0.1)
        0.1054
    """
    index = repeat_token_index(answer_ids, answer_mask, n, prefix_ids, prefix_mask).to(logits.device)
    if len(index) == 0:
        return zero_loss(logits)
    B, L, _ = logits.shape
    b, t, v = index.unbind(1)  # (K,) each
    logp = logits.float().log_softmax(-1)  # (B, L, V)
    p_repeat = torch.zeros(B, L, device=logits.device).index_put((b, t), logp[b, t, v].exp(), accumulate=True)
    applies = torch.zeros(B, L, dtype=torch.bool, device=logits.device)
    applies[b, t] = True
    return _neg_log_one_minus(p_repeat[applies]).mean()


def keyword_positions(answer_mask: Tensor, question_ids: Tensor, question_mask: Tensor, vocab_size: int,
                      ignore_ids: Iterable[int] | None = None) -> tuple[Tensor, Tensor]:
    """(keywords (B, V) bool: row b's question tokens that count as keywords, applies (B, L) bool: the answer
    positions `keyword_overlap_penalty` averages over, those of rows with at least one keyword)."""
    B, V, device = len(question_ids), vocab_size, answer_mask.device
    keywords = torch.zeros(B, V, dtype=torch.bool, device=device)  # (B, V) row b's question tokens
    ignore = torch.tensor(sorted(set(ignore_ids or ())), dtype=torch.long, device=device)
    question_ids, question_mask = question_ids.to(device), question_mask.to(device)
    valid = question_mask & (question_ids >= 0) & (question_ids < V)
    rows = torch.arange(B, device=device)[:, None].expand_as(question_ids)
    keywords[rows[valid], question_ids[valid]] = True
    if len(ignore):
        keywords[:, ignore[(ignore >= 0) & (ignore < V)]] = False
    return keywords, answer_mask & keywords.any(1, keepdim=True)  # rows with no keyword have nothing to punish


def keyword_overlap_penalty(logits: Tensor, answer_mask: Tensor, question_ids: Tensor, question_mask: Tensor,
                            answer_ids: Tensor | None = None, ignore_ids: Iterable[int] | None = None) -> Tensor:
    """Probability mass an answer spends parroting the question: mean over answer positions of p(question tokens).

    It punishes keyword-happy answers, ones that repeat the question's words instead of answering.
    At each answer position the value is the expected mass softmax(logits)[question token ids].sum(),
    excluding the gold token at that position, so a correct answer that must reuse a question word
    (Q: "Which river flows through Paris?" A: "the Seine river") is not punished for it. Tokens in
    `ignore_ids` (e.g. `stopword_token_ids(tokenizer)`: "the", "of", "?") never count as keywords.

    An earlier formulation, weight * (1 - |answer tokens in prompt| / |prompt tokens|), grew smaller
    the more of the prompt's words the answer used: it pulled answers toward the prompt's words, the
    opposite of its stated purpose. (It was also computed from argmax tokens, so it had no gradient.)

    Args:
        logits: (B, L, V) logits predicting answer token t.
        answer_mask: (B, L) bool, True on real answer positions.
        question_ids: (B, Q) the question's tokens; padded positions may hold any id.
        question_mask: (B, Q) bool, True on real question tokens.
        answer_ids: (B, L) gold answer tokens, so the gold token is excluded (None: nothing excluded).
        ignore_ids: token ids that are never keywords.

    Example:
        >>> logits = torch.zeros(1, 2, 10, requires_grad=True)  # uniform: p = 0.1 per token
        >>> q, qmask = torch.tensor([[3, 4]]), torch.tensor([[True, True]])
        >>> amask = torch.tensor([[True, True]])
        >>> round(keyword_overlap_penalty(logits, amask, q, qmask).item(), 4)  # p(3) + p(4)
        0.2
        >>> round(keyword_overlap_penalty(logits, amask, q, qmask, answer_ids=torch.tensor([[3, 0]])).item(), 4)
        0.15
    """
    V = logits.shape[-1]
    keywords, applies = keyword_positions(answer_mask, question_ids, question_mask, V, ignore_ids)
    if not applies.any():
        return zero_loss(logits)
    probs = logits.float().softmax(-1)  # (B, L, V)
    p_keywords = torch.bmm(probs, keywords.float().unsqueeze(-1)).squeeze(-1)  # (B, L)
    if answer_ids is not None:
        gold = answer_ids.clamp(0, V - 1)  # padded ids may be out of range; those positions are masked anyway
        gold_is_keyword = keywords.gather(1, gold)  # (B, L)
        p_gold = probs.gather(-1, gold.unsqueeze(-1)).squeeze(-1)  # (B, L)
        p_keywords = p_keywords - torch.where(gold_is_keyword, p_gold, torch.zeros_like(p_gold))
    return p_keywords[applies].mean()


def short_answer_positions(answer_mask: Tensor, words_before: Tensor, eos_id: int, min_words: int = 4,
                           answer_ids: Tensor | None = None) -> Tensor:
    """(B, L) bool: the positions `short_answer_penalty` averages over (fewer than min_words words, gold not EOS)."""
    if answer_ids is not None:
        gold_eos = answer_ids == eos_id
    else:  # the answer layout ends every row with its EOS
        gold_eos = answer_mask & (answer_mask.long().cumsum(1) == answer_mask.sum(1, keepdim=True))  # last real
    return answer_mask & (words_before < min_words) & ~gold_eos


def short_answer_penalty(logits: Tensor, answer_mask: Tensor, words_before: Tensor, eos_id: int, min_words: int = 4,
                         answer_ids: Tensor | None = None) -> Tensor:
    """Discourages stopping early: mean of -log(1 - p(EOS)) over positions with fewer than `min_words` words.

    Applies at answer positions where words_before < min_words and the gold token is not EOS, so it
    never fights a gold EOS: a gold answer shorter than min_words still ends where its label ends.
    Without answer_ids, the last real position of each row is taken as the gold EOS.

    Args:
        logits: (B, L, V) logits predicting answer token t.
        answer_mask: (B, L) bool, True on real answer positions.
        words_before: (B, L) long, complete words of the gold answer before position t.
        eos_id: id of the end-of-sequence token.
        min_words: answers shorter than this are penalised.
        answer_ids: (B, L) gold answer tokens (None: the last real position is the EOS).

    Example:
        >>> logits = torch.zeros(1, 3, 4, requires_grad=True)  # p(EOS) = 0.25
        >>> ids, mask = torch.tensor([[1, 2, 0]]), torch.ones(1, 3, dtype=torch.bool)
        >>> words = torch.tensor([[0, 1, 2]])
        >>> round(short_answer_penalty(logits, mask, words, eos_id=0, answer_ids=ids).item(), 4)  # -log(0.75)
        0.2877
    """
    applies = short_answer_positions(answer_mask, words_before, eos_id, min_words, answer_ids)  # (B, L)
    if not applies.any():
        return zero_loss(logits)
    p_eos = logits.float().log_softmax(-1)[..., eos_id].exp()  # (B, L)
    return _neg_log_one_minus(p_eos[applies]).mean()


def stopword_token_ids(tokenizer, words: Iterable[str] = STOPWORDS,
                       punctuation: Iterable[str] = PUNCTUATION) -> set[int]:
    """Ids of tokens that are a stop word or punctuation on their own (with or without a leading space).

    Meant for `keyword_overlap_penalty(ignore_ids=...)`: "What", " the", "?" are not keywords.
    Special tokens (BOS, EOS, pad) are included too.
    """
    ids = set(tokenizer.all_special_ids)
    for w in list(words) + list(punctuation):
        for variant in {w, " " + w, w.capitalize(), " " + w.capitalize()}:
            toks = tokenizer.encode(variant, add_special_tokens=False)
            if len(toks) == 1:
                ids.add(toks[0])
    return ids


class GeneratorLoss(nn.Module):
    """The generator's training loss: answer NLL plus weighted penalties.

    total = lm + ngram_repeat_weight * ngram_repeat + keyword_overlap_weight * keyword_overlap
               + short_answer_weight * short_answer

    Args:
        ngram_repeat_n: n of the n-gram repeat penalty.
        ngram_repeat_weight: weight of `ngram_repeat_penalty`.
        keyword_overlap_weight: weight of `keyword_overlap_penalty`.
        short_answer_min_words: answers shorter than this are penalised by `short_answer_penalty`.
        short_answer_weight: weight of `short_answer_penalty`.
        keyword_ignore_ids: token ids that are never keywords (e.g. `stopword_token_ids(tokenizer)`).
        ngram_include_prefix: also count the prompt's n-grams as history (default: the answer's own only).

    Inputs (`forward(logits, batch)`):
        logits: (B, L, V) logits at answer positions.
        batch: dict with answer_ids (B, L), answer_mask (B, L), question_ids (B, Q), question_mask (B, Q),
            words_before (B, L), eos_id (int), and prefix_ids / prefix_mask (B, P) when ngram_include_prefix.

    Returns:
        (total, parts): total is a scalar with grad; parts maps "lm", "ngram_repeat", "keyword_overlap",
        "short_answer" to their unweighted, detached scalar values (for logging).

    Example:
        >>> loss_fn = GeneratorLoss(keyword_overlap_weight=0.0)
        >>> batch = dict(answer_ids=torch.tensor([[1, 2, 0]]), answer_mask=torch.ones(1, 3, dtype=torch.bool),
        ...              question_ids=torch.tensor([[1]]), question_mask=torch.tensor([[True]]),
        ...              words_before=torch.tensor([[0, 1, 2]]), eos_id=0)
        >>> total, parts = loss_fn(torch.zeros(1, 3, 5, requires_grad=True), batch)
        >>> sorted(parts)
        ['keyword_overlap', 'lm', 'ngram_repeat', 'short_answer']
    """

    def __init__(self, ngram_repeat_n: int = 3, ngram_repeat_weight: float = 0.1, keyword_overlap_weight: float = 4.0,
                 short_answer_min_words: int = 4, short_answer_weight: float = 5.0,
                 keyword_ignore_ids: Iterable[int] | None = None, ngram_include_prefix: bool = False):
        super().__init__()
        self.ngram_repeat_n = ngram_repeat_n
        self.ngram_repeat_weight = ngram_repeat_weight
        self.keyword_overlap_weight = keyword_overlap_weight
        self.short_answer_min_words = short_answer_min_words
        self.short_answer_weight = short_answer_weight
        self.keyword_ignore_ids = set(keyword_ignore_ids or ())
        self.ngram_include_prefix = ngram_include_prefix

    @classmethod
    def from_config(cls, cfg, **kwargs) -> "GeneratorLoss":
        """Weights from a Config; kwargs (keyword_ignore_ids, ngram_include_prefix) pass through."""
        return cls(ngram_repeat_n=cfg.ngram_repeat_n, ngram_repeat_weight=cfg.ngram_repeat_weight,
                   keyword_overlap_weight=cfg.keyword_overlap_weight, short_answer_min_words=cfg.short_answer_min_words,
                   short_answer_weight=cfg.short_answer_weight, **kwargs)

    def positions(self, batch: dict, vocab_size: int) -> dict[str, int]:
        """How many answer positions each part of `forward` averages over in `batch` (its mean's denominator).

        They depend on the batch alone (no logits), so a training step of several micro-batches (and ranks)
        can count them before any forward and pass each micro-batch its share as `forward(weights=...)`.
        """
        ids, mask = batch["answer_ids"], batch["answer_mask"]
        prefix = (batch["prefix_ids"], batch.get("prefix_mask")) if self.ngram_include_prefix else (None, None)
        repeats = repeat_token_index(ids, mask, self.ngram_repeat_n, prefix[0], prefix[1])
        _, keyword = keyword_positions(mask, batch["question_ids"], batch["question_mask"], vocab_size,
                                       self.keyword_ignore_ids)
        return {"lm": int(mask.sum()), "ngram_repeat": len(torch.unique(repeats[:, :2], dim=0)) if len(repeats) else 0,
                "keyword_overlap": int(keyword.sum()),
                "short_answer": int(short_answer_positions(mask, batch["words_before"], int(batch["eos_id"]),
                                                           self.short_answer_min_words, ids).sum())}

    def forward(self, logits: Tensor, batch: dict, weights: dict[str, float] | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, parts); `weights` multiplies each part (default 1): a micro-batch's share of the step's
        positions of that part (`positions`), so that summed over the step the parts are its means."""
        ids, mask = batch["answer_ids"], batch["answer_mask"]
        prefix = (batch["prefix_ids"], batch.get("prefix_mask")) if self.ngram_include_prefix else (None, None)
        eos_id = int(batch["eos_id"])
        parts = {
            "lm": answer_nll(logits, ids, mask),
            "ngram_repeat": ngram_repeat_penalty(logits, ids, mask, n=self.ngram_repeat_n,
                                                 prefix_ids=prefix[0], prefix_mask=prefix[1]),
            "keyword_overlap": keyword_overlap_penalty(logits, mask, batch["question_ids"], batch["question_mask"],
                                                       answer_ids=ids, ignore_ids=self.keyword_ignore_ids),
            "short_answer": short_answer_penalty(logits, mask, batch["words_before"], eos_id,
                                                 min_words=self.short_answer_min_words, answer_ids=ids),
        }
        if weights is not None:
            parts = {k: v * weights[k] for k, v in parts.items()}
        total = (parts["lm"] + self.ngram_repeat_weight * parts["ngram_repeat"]
                 + self.keyword_overlap_weight * parts["keyword_overlap"]
                 + self.short_answer_weight * parts["short_answer"])
        return total, {k: v.detach() for k, v in parts.items()}

    def get_config_dict(self) -> dict:
        return {"ngram_repeat_n": self.ngram_repeat_n, "ngram_repeat_weight": self.ngram_repeat_weight,
                "keyword_overlap_weight": self.keyword_overlap_weight,
                "short_answer_min_words": self.short_answer_min_words, "short_answer_weight": self.short_answer_weight,
                "keyword_ignore_ids": len(self.keyword_ignore_ids), "ngram_include_prefix": self.ngram_include_prefix}
