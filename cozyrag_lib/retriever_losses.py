"""The retriever's losses, on unit embeddings (cosine scores):

    contrastive_retriever_loss    in-batch InfoNCE between questions and the passages they retrieved
    lm_supervised_retriever_loss  the retriever's distribution over its candidates pulled (KL) toward how
                                  much each candidate helps the generator say the gold answer
    gold_passage_loss             InfoNCE toward a known gold passage, retrieved non-gold passages as hard
                                  negatives (a negative that is a row's gold passage, by id, is masked)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import zero_loss


def contrastive_retriever_loss(q: Tensor, p: Tensor, temperature: float = 0.1) -> Tensor:
    """In-batch InfoNCE: question i should score its own passage above the other questions' passages.

    Cross-entropy over q @ p.T / temperature with targets arange(B). Passages of other items are the
    negatives, so two questions that retrieved the same passage make a (harmless, rare) false negative.

    Args:
        q: (B, d) L2-normalised question embeddings.
        p: (B, d) L2-normalised embeddings of the passage each question retrieved.
        temperature: softmax temperature; 0.1 ~ a scale of 10 on cosine similarities.

    Example:
        >>> q = torch.eye(2)
        >>> round(contrastive_retriever_loss(q, q).item(), 6)  # log(1 + e^-10)
        4.5e-05
    """
    scores = q @ p.T / temperature  # (B, B)
    return F.cross_entropy(scores, torch.arange(len(q), device=q.device))


def lm_supervised_retriever_loss(scores: Tensor, answer_logprob: Tensor, tau: float = 0.1,
                                 target_temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """KL(target || retriever): retrieve the passages that make the generator most likely to say the answer.

    target = softmax(answer_logprob / target_temperature) over the K candidates (no gradient) and
    the retriever's distribution is softmax(scores / tau); the loss is KL(target || retriever)
    averaged over questions. Its gradient raises the scores of candidates under which the gold
    answer is more likely than the retriever currently believes, and lowers the others.

    Args:
        scores: (B, K) retriever similarities q . p_k (with grad).
        answer_logprob: (B, K) the generator's mean per-token log-likelihood of the gold answer given
            candidate k (detached here in any case).
        tau: temperature of the retriever softmax.
        target_temperature: temperature of the target softmax (lower: sharper, toward the best passage).
        mask: (B, K) bool, False for missing candidates (None: all present). Rows with none are skipped.

    Example:
        >>> scores = torch.tensor([[0.5, 0.5]], requires_grad=True)  # retriever undecided
        >>> lp = torch.tensor([[-0.5, -3.0]])                         # passage 0 helps the generator
        >>> loss = lm_supervised_retriever_loss(scores, lp)
        >>> loss.backward(); bool(scores.grad[0, 0] < 0 < scores.grad[0, 1])  # gradient descent raises score 0
        True
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    rows = mask.any(1)  # (B,) questions with at least one candidate
    if not rows.any():
        return zero_loss(scores)
    scores, answer_logprob, mask = scores[rows], answer_logprob[rows].detach(), mask[rows]
    very_negative = torch.finfo(torch.float32).min  # not -inf: keeps 0 * log q finite for missing candidates
    log_q = (scores.float() / tau).masked_fill(~mask, very_negative).log_softmax(-1)  # (B, K)
    target = (answer_logprob.float() / target_temperature).masked_fill(~mask, very_negative).softmax(-1)  # (B, K)
    kl = torch.xlogy(target, target) - target * log_q  # (B, K); 0 where target is 0
    return kl.masked_fill(~mask, 0.0).sum(1).mean()


def gold_passage_loss(q: Tensor, pos: Tensor, negatives: Tensor | None = None, temperature: float = 0.1,
                      negatives_mask: Tensor | None = None, pos_ids: Tensor | None = None,
                      negative_ids: Tensor | None = None) -> Tensor:
    """InfoNCE toward a known gold passage, against the other items' gold passages and hard negatives.

    Question i's candidates are every gold passage in the batch (its own is the target) and every
    hard negative in the batch (all B * M of them, as in multiple-negatives ranking). With
    negatives=None it equals `contrastive_retriever_loss(q, pos)`.

    With passage ids, no candidate that IS question i's gold passage counts as a negative for i: not
    another row's copy of the same gold (SQuAD asks several questions per paragraph), not a hard negative some
    other row retrieved. Without ids every other column is a negative, duplicates included.

    Args:
        q: (B, d) L2-normalised question embeddings.
        pos: (B, d) L2-normalised gold passage embeddings.
        negatives: (B, M, d) L2-normalised hard negatives (retrieved passages), or None.
        temperature: softmax temperature.
        negatives_mask: (B, M) bool, False for missing negatives (None: all present).
        pos_ids: (B,) passage id (row) of each gold passage.
        negative_ids: (B, M) passage id of each hard negative (needs pos_ids).

    Example:
        >>> q = torch.eye(2)
        >>> neg = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])  # each question's hard negative is the other's gold
        >>> gold_passage_loss(q, q, neg).item() > gold_passage_loss(q, q).item()
        True
    """
    B = len(q)
    target = torch.arange(B, device=q.device)
    scores = q @ pos.T / temperature  # (B, B)
    drop = torch.zeros_like(scores, dtype=torch.bool)  # (B, columns) True: not a negative of row i
    if pos_ids is not None:  # another row's copy of my gold passage
        pos_ids = pos_ids.to(q.device)
        drop = (pos_ids[None, :] == pos_ids[:, None]) & (target[None, :] != target[:, None])
    if negatives is not None:
        neg_scores = q @ negatives.reshape(-1, negatives.shape[-1]).T / temperature  # (B, B*M)
        neg_drop = torch.zeros_like(neg_scores, dtype=torch.bool)
        if negatives_mask is not None:  # missing negatives, for every row
            neg_drop |= ~negatives_mask.to(q.device).reshape(1, -1)
        if pos_ids is not None and negative_ids is not None:  # a hard negative (anyone's) that is my gold
            neg_drop |= negative_ids.to(q.device).reshape(1, -1) == pos_ids[:, None]
        scores, drop = torch.cat([scores, neg_scores], dim=1), torch.cat([drop, neg_drop], dim=1)  # (B, B + B*M)
    scores = scores.masked_fill(drop, torch.finfo(scores.dtype).min)
    return F.cross_entropy(scores, target)
