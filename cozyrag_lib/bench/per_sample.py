"""A reference implementation of the per-sample training step CoZyRAG's generator phase replaced.

It is kept runnable for one purpose only: `bench train` times it beside ours on the same questions and
reports the ratio. Training never uses it, and nothing should be built on it. It reproduces the original
loop's costs on purpose:

- for each item, every epoch: encode the question alone, search FAISS for it alone, split its passages
  into sentences, encode those sentences, keep the `train_max_sentences` most similar ones;
- every sample padded to `max_length`, and `model(input_ids, labels=...)` computing logits at every position;
- the three penalties taken from argmax tokens, so they add to the loss but have no gradient.

Prompts, answers and token budgets are the same as ours, so both steps learn from the same tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from ..retrieval import encode_example, truncate_tokens
from ..text import split_sentences
from ..train_steps import optimizer_step
from .common import Stopwatch


class PerSampleStep:
    """The per-sample training step CoZyRAG's loop replaced, kept runnable to compare against (bench only)."""

    def __init__(self, cfg, lm, tokenizer, retriever, pindex, autocast):
        self.cfg, self.lm, self.tok, self.retriever, self.pindex, self.autocast = cfg, lm, tokenizer, retriever, pindex, autocast
        self.device = next(lm.parameters()).device
        self.opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr_generator, weight_decay=cfg.weight_decay)

    def context(self, question: str) -> str:
        cfg, passages = self.cfg, self.pindex.passages
        q = self.retriever.encode([question], normalize_embeddings=True, show_progress_bar=False)  # (1, d)
        _, ids = self.pindex.search(q, cfg.top_k)  # (1, k): one search for one question
        sentences = [s for j in ids[0] if j >= 0 for s in split_sentences(passages[j]["text"]) or [passages[j]["text"]]]
        if not sentences:
            return ""
        emb = self.retriever.encode(sentences, normalize_embeddings=True, show_progress_bar=False)  # (S, d)
        best = np.argsort(-(emb @ q[0]), kind="stable")[:cfg.train_max_sentences]
        return truncate_tokens(self.tok, " ".join(sentences[i] for i in best), cfg.context_tokens)

    def batch(self, items: list[dict], contexts: list[str]) -> dict:
        """(B, max_length) input_ids, attention_mask, labels (-100 except on answer + EOS), and answer spans."""
        cfg, tok = self.cfg, self.tok
        B, T = len(items), cfg.max_length
        input_ids = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        spans = []
        for b, (it, c) in enumerate(zip(items, contexts)):
            e = encode_example(tok, it["question"], c, it["answers"][0], cfg.prompt_template, cfg.max_length)
            seq, start = e["prompt_ids"] + e["answer_ids"], len(e["prompt_ids"])
            input_ids[b, :len(seq)] = torch.tensor(seq)
            attention_mask[b, :len(seq)] = 1
            labels[b, start:len(seq)] = torch.tensor(e["answer_ids"])
            spans.append((start, len(seq)))
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
                "labels": labels.to(self.device), "spans": spans}

    @torch.no_grad()
    def argmax_penalties(self, logits: torch.Tensor, batch: dict) -> float:
        """n-gram repeats, prompt-token overlap and short answers of the argmax answer: a constant per batch."""
        cfg, n = self.cfg, self.cfg.ngram_repeat_n
        preds = logits.argmax(-1).cpu()  # (B, T) the token each position predicts
        ids = batch["input_ids"].cpu()
        total = 0.0
        for b, (start, end) in enumerate(batch["spans"]):
            pred = preds[b, start - 1:end - 1].tolist()  # the predicted answer tokens
            prompt = set(ids[b, :start].tolist())
            grams = [tuple(pred[i:i + n]) for i in range(len(pred) - n + 1)]
            repeat = (len(grams) - len(set(grams))) / max(1, len(grams))
            overlap = 1.0 - len(set(pred) & prompt) / max(1, len(prompt))
            short = float(len(self.tok.decode(pred, skip_special_tokens=True).split()) < cfg.short_answer_min_words)
            total += (cfg.ngram_repeat_weight * repeat + cfg.keyword_overlap_weight * overlap
                      + cfg.short_answer_weight * short)
        return total / len(batch["spans"])

    def step(self, items: list[dict], watch: Stopwatch) -> dict:
        """One optimizer step over `items`, timed in `watch`; what the FLOP count needs, and the loss."""
        with watch("retrieval"), self.autocast():  # the retriever under the same precision as ours
            contexts = [self.context(it["question"]) for it in items]
        with watch("batch"):
            batch = self.batch(items, contexts)
        with watch("forward_backward"):
            with self.autocast():
                out = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"])  # logits (B, T, V) at every position
            loss = out.loss + self.argmax_penalties(out.logits, batch)
            loss.backward()
        with watch("optimizer"):
            optimizer_step(self.opt, self.cfg.grad_clip)
        B, T = batch["input_ids"].shape
        return {"lengths": [end for _, end in batch["spans"]], "width": T,
                "head": sum(end - start for start, end in batch["spans"]), "head_processed": B * T, "loss": float(loss.detach())}
