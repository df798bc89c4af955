"""One optimizer step's losses, and the model wrappers they run through.

* `AnswerLM` - the causal LM with LM-head logits only at the positions that predict answer tokens;
* `RetrieverEncoder` - unit embeddings of several feature batches in one forward (one DDP forward per backward);
* `generator_loss` - answer NLL + penalties (`losses.GeneratorLoss`) of a padded prompt -> answer batch;
* `retriever_loss` - `lm_supervised`: KL from the retriever's softmax over its candidates to how likely
  each candidate makes the generator say the gold answer, + InfoNCE toward the gold passage when known;
  `contrastive`: in-batch InfoNCE on (question, the context it retrieved).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from sentence_transformers.util import batch_to_device
from torch import nn

from . import distributed
from .errors import CozyError
from .master import MasterWeights
from .embedding import passage_texts
from .models import eval_mode, is_peft, unwrap
from .retrieval import collate, encode_example, to_device, truncate_tokens
from .retriever_losses import contrastive_retriever_loss, gold_passage_loss, lm_supervised_retriever_loss
from .train_state import Run

# ----------------------------------------------------------------------------------------------
# models: logits only where the answer is predicted


def base_model_of(lm: nn.Module) -> nn.Module:
    """The transformer under a causal LM's head (GPT-2: .transformer, Llama: .model), found generically."""
    if is_peft(lm):  # LoRA: the causal LM under peft's wrapper, its adapters in place
        lm = lm.get_base_model()
    base = getattr(lm, "base_model", None)
    if base is not None and base is not lm:
        return base
    get = getattr(lm, "get_decoder", None)
    if get is not None and get() is not None:
        return get()
    raise CozyError(f"generator {type(lm).__name__}: cannot find its base model (no base_model or get_decoder)")


class AnswerLM(nn.Module):
    """A causal LM that returns LM-head logits only at the positions that predict answer tokens.

    The full (B, T, V) logits of a 49k-token vocabulary are the largest tensor of a step; the answer
    is a few tokens of a prompt of a hundred or more, so the head runs on (B, L, H) gathered states.
    Wrapping the whole computation in one module lets DDP see one forward per backward.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = base_model_of(self.lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out[0]  # (B, T, H) final hidden states (after the last norm)
        gathered = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))  # (B, L, H)
        return self.lm.get_output_embeddings()(gathered)  # (B, L, V)


class RetrieverEncoder(nn.Module):
    """Unit embeddings for several feature batches in ONE forward (so DDP sees one forward per backward)."""

    def __init__(self, st):
        super().__init__()
        self.st = st

    def forward(self, *features):
        return tuple(None if f is None else F.normalize(self.st(f)["sentence_embedding"].float(), dim=-1)
                     for f in features)


def encode_features(retriever, texts: list[str], device) -> dict:
    """Tokenised retriever inputs on `device` (sentence-transformers >= 6: preprocess, before: tokenize)."""
    st = unwrap(retriever)
    prep = getattr(st, "preprocess", None) or st.tokenize
    return batch_to_device(prep(texts), device)


@torch.no_grad()
def answer_logprobs(lm, batch: dict) -> torch.Tensor:
    """(B,) the generator's mean per-token log-prob of each row's answer (+ EOS), no grad, eval mode."""
    with eval_mode(lm):
        logits = AnswerLM(lm)(batch["input_ids"], batch["attention_mask"], batch["positions"]).float()  # (B, L, V)
    logp = logits.log_softmax(-1).gather(-1, batch["answer_ids"].unsqueeze(-1)).squeeze(-1)  # (B, L)
    mask = batch["answer_mask"].float()
    return (logp * mask).sum(1) / mask.sum(1).clamp(min=1)


# ----------------------------------------------------------------------------------------------
# the losses of one micro-batch


def get_batch(run: Run, kind: str, rows: list[int]) -> dict:
    """The micro-batch for item rows: padded generator tensors, or questions + candidates for the retriever."""
    cfg, tok = run.cfg, run.tokenizer
    items = [run.items[i] for i in rows]
    if kind == "generator":
        examples = [encode_example(tok, it["question"], run.phase_data["contexts"][it["id"]], it["answers"][0],
                                   cfg.prompt_template, cfg.max_length) for it in items]
        return to_device(collate(examples, tok.pad_token_id, tok.eos_token_id), run.device)
    batch = {"questions": [it["question"] for it in items], "answers": [it["answers"][0] for it in items],
             "gold": [run.gold[i] for i in rows]}
    if cfg.retriever_loss == "contrastive":
        batch["contexts"] = [run.phase_data["contexts"][it["id"]] for it in items]
    else:
        batch["candidates"] = [run.phase_data["candidates"][it["id"]] for it in items]
    return batch


def generator_loss(run: Run, batch: dict, weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict]:
    """The micro-batch's loss and its parts; `weights` from `step_weights` (None: this batch is the whole step)."""
    with run.autocast():
        logits = run.gen_model(batch["input_ids"], batch["attention_mask"], batch["positions"])  # (B, L, V)
    total, parts = run.loss_fn(logits.float(), batch, weights)
    return total, {"loss": total.detach(), **parts}


def optimizer_step(opt: torch.optim.Optimizer, grad_clip: float, master: MasterWeights | None = None) -> None:
    """The end of a training step: with master weights the bf16 gradients onto the fp32 copies first; clip the
    global norm (grad_clip > 0), step, drop the gradients; the stepped copies back into the bf16 model."""
    if master is not None:
        master.pull_grads()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if master is not None:
        master.push()


def step_weights(run: Run, batches: list[dict]) -> list[dict[str, float]]:
    """For each micro-batch of one generator step, each loss part's weight: its share of that part's positions
    in the whole step (every micro-batch of every rank), times the world size (DDP averages gradients over ranks).

    Every part is a mean over positions, and a mean of per-micro-batch means weighs a short answer's tokens
    more than a long one's; with these weights the step's loss and gradient are those of the global batch
    taken at once, whatever grad_accum and the number of processes. One process, one micro-batch: all 1.0.
    """
    vocab = run.generator.get_output_embeddings().weight.shape[0]
    counts = [run.loss_fn.positions(b, vocab) for b in batches]
    keys = sorted(counts[0])
    totals = [sum(c[k] for c in counts) for k in keys]
    if distributed.is_distributed():
        totals = [sum(col) for col in zip(*distributed.all_gather_object(totals))]
    world = distributed.get_world_size()
    return [{k: c[k] * world / n if n else 0.0 for k, n in zip(keys, totals)} for c in counts]


def passage_text(p: dict) -> str:
    """What the retriever embeds for a passage (title-led, as in the index)."""
    return passage_texts([p])[0]


def encode_for_loss(run: Run, questions: list[str], *passage_lists: list[str] | None) -> tuple:
    """Question and passage embeddings with grad; with query_only the passage side is the frozen copy."""
    dev = run.device
    feats = [encode_features(run.retriever, questions, dev)]
    if run.cfg.query_only:
        with torch.no_grad(), run.autocast():
            frozen = [None if t is None else F.normalize(
                run.passage_encoder(encode_features(run.passage_encoder, t, dev))["sentence_embedding"].float(), dim=-1)
                for t in passage_lists]
        with run.autocast():
            (q,) = run.ret_model(*feats)
        return (q, *frozen)
    feats += [None if t is None else encode_features(run.retriever, t, dev) for t in passage_lists]
    with run.autocast():
        return run.ret_model(*feats)


def candidate_logprobs(run: Run, questions: list[str], answers: list[str], cand: torch.Tensor) -> torch.Tensor:
    """(B, C) the generator's mean per-token log-prob of the gold answer with each candidate passage as context.

    No grad, eval mode, `batch_size` prompts per forward; missing candidates (-1) get -1e4.
    """
    cfg, tok, passages = run.cfg, run.tokenizer, run.pindex.passages
    examples = [encode_example(tok, q, truncate_tokens(tok, passage_text(passages[j]), cfg.context_tokens), a,
                               cfg.prompt_template, cfg.max_length)
                for q, a, row in zip(questions, answers, cand.tolist()) for j in row if j >= 0]
    flat = []
    for s in range(0, len(examples), cfg.batch_size):
        batch = to_device(collate(examples[s:s + cfg.batch_size], tok.pad_token_id, tok.eos_token_id), run.device)
        with run.autocast():
            flat.append(answer_logprobs(run.generator, batch).float().cpu())
    logprob = torch.full(cand.shape, -1e4)
    logprob[cand >= 0] = torch.cat(flat) if flat else torch.zeros(0)
    return logprob


def retriever_loss(run: Run, batch: dict) -> tuple[torch.Tensor, dict]:
    """contrastive: InfoNCE on (question, its retrieved context); lm_supervised: KL to the generator's target."""
    cfg, passages = run.cfg, run.pindex.passages
    if cfg.retriever_loss == "contrastive":
        q, p = encode_for_loss(run, batch["questions"], batch["contexts"])
        loss = contrastive_retriever_loss(q, p, cfg.retriever_temperature)
        return loss, {"loss": loss.detach(), "retriever_loss": loss.detach()}
    cand = torch.tensor(batch["candidates"])  # (B, C) passage rows, -1 = none found
    B, C = cand.shape
    valid = cand >= 0
    logprob = candidate_logprobs(run, batch["questions"], batch["answers"], cand)  # (B, C) target, no grad
    # scores: the retriever re-encodes questions and candidates WITH grad
    gold = torch.tensor(batch["gold"])  # (B,)
    has_gold = gold >= 0
    q, p, g = encode_for_loss(run, batch["questions"], [passage_text(passages[j]) for j in cand[valid].tolist()],
                              [passage_text(passages[j]) for j in gold[has_gold].tolist()] or None)
    p_full = q.new_zeros(B, C, q.shape[-1])
    p_full[valid.to(q.device)] = p  # (B, C, d)
    scores = torch.einsum("bd,bcd->bc", q, p_full)  # (B, C) cosine
    kl = lm_supervised_retriever_loss(scores, logprob.to(q.device), cfg.retriever_temperature, cfg.target_temperature,
                                      valid.to(q.device))
    parts = {"retriever_kl": kl.detach(), "gold_passage": torch.zeros(())}  # same keys on every rank
    loss = kl
    if g is not None:  # InfoNCE toward the known gold passage, retrieved non-gold passages as hard negatives
        h = has_gold.to(q.device)
        # by passage id, no row's gold counts as its negative: neither a duplicate of it in the batch nor a hard
        # negative any row retrieved
        gp = gold_passage_loss(q[h], g, p_full[h], cfg.retriever_temperature, negatives_mask=valid.to(q.device)[h],
                               pos_ids=gold[has_gold], negative_ids=cand[has_gold])
        parts["gold_passage"] = gp.detach()
        loss = loss + gp
    return loss, {"loss": loss.detach(), "retriever_loss": loss.detach(), **parts}
