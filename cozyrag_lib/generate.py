"""Generation: batched answers from prompts, and cleaning what the generator says.

    >>> answers = generate_answers(model, tokenizer, prompts, max_new_tokens=48)  # doctest: +SKIP
    >>> postprocess_answer("A: Paris<|im_end|>\\nQ: next question")
    'Paris'
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

from .models import eval_mode, unwrap

# Markup a generator may emit that never belongs in an answer: special tokens like <|im_end|> or
# <|endoftext|>, and bracketed internal markers like <SEP> or <pad>.
_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>|<(?:SEP|sep|pad|PAD|unk|UNK|CLS|cls|MASK|mask|eos|bos)>")
# Where an answer ends when the model runs on into a new prompt: a newline, or a new "Q:" / "Question:" /
# "Context:" label after a space. An "A:" inside the answer is content ("Vitamin A: a nutrient"), not a cut.
_RUN_ON = re.compile(r"\n|\s(?:Q|Question|Context):(?=\s|$)")
_LEAD = re.compile(r"^\s*(?:A|Answer)\s*:\s*", re.IGNORECASE)
# The end of a first sentence once a second one has begun: ".", "!" or "?" after two lower-case letters or
# digits (so "U.S." and "Dr." do not end one), maybe a closing quote or bracket, then space and more text.
_SENTENCE_END = re.compile(r"(?<=[a-z0-9%]{2})[.!?][\"')\]]?(?=\s+\S)")
# A small model's degenerate loop: one to three words, the first with a letter, said four or more times in a row
# ("Carl Gustav Jacob Jacob Jacob Jacob ..."). Three times stays an answer ("Tora! Tora! Tora!"), and so do numbers
# ("0, 0, 0, 0, 1"); four is a loop, cut after its first copy. Generation stops at one only once the word after the
# fourth copy has begun (_LOOP_STOP): "Jacob Jacob Jacob Jacob" may still become "... Jacobi".
_LOOP = re.compile(r"(?<!\S)((?=\S*[^\W\d_])\S+(?:\s+\S+){0,2}?)(?:\s+\1(?!\S)){3,}")
_LOOP_STOP = re.compile(_LOOP.pattern + r"(?=\s)")


def first_sentence(text: str) -> str:
    """The text up to the end of its first sentence (all of it when it has one sentence).

    >>> first_sentence("Paris is the capital of France. It lies on the Seine.")
    'Paris is the capital of France.'
    >>> first_sentence("The U.S. Army was founded in 1775. Later ...")
    'The U.S. Army was founded in 1775.'
    """
    m = _SENTENCE_END.search(text)
    return text[:m.end()] if m else text


def postprocess_answer(text: str, prompt: str | None = None) -> str:
    """The answer alone: no special tokens, no echoed prompt or "A:" label, nothing after a newline.

    >>> postprocess_answer("Q: Who? Context: x A: Ann")   # echoed prompt: keep what follows the last A:
    'Ann'
    >>> postprocess_answer("  A: German physicist</s> extra\\nQ:")
    'German physicist extra'
    >>> postprocess_answer("Vitamin A: a nutrient")   # a label inside the answer is kept
    'Vitamin A: a nutrient'
    >>> postprocess_answer("Carl Gustav Jacob Jacob Jacob Jacob Jacob")   # a loop ends after its first copy
    'Carl Gustav Jacob'
    """
    text = _SPECIAL.sub("", text)
    if prompt and text.startswith(prompt):  # a model that echoes its whole prompt
        text = text[len(prompt):]
    if re.match(r"\s*(?:Q|Question)\s*:", text, re.IGNORECASE):  # an echoed plain prompt: answer follows its A:
        parts = re.split(r"\b(?:A|Answer)\s*:", text, flags=re.IGNORECASE)
        text = parts[-1] if len(parts) > 1 else ""
    text = _LEAD.sub("", text.lstrip())
    text = " ".join(_RUN_ON.split(text, maxsplit=1)[0].split())
    loop = _LOOP.search(text)
    return text[:loop.end(1)].rstrip(",;:") if loop else text


class _StopAtNewline:
    """Stopping criterion: a row is done once its generated text has a newline after some content (with
    `sentence`, also once a second sentence has begun; with `loops`, also once it repeats itself, see _LOOP:
    `postprocess_answer` cuts the rest anyway)."""

    def __init__(self, tokenizer, prompt_len: int, sentence: bool = False, loops: bool = True):
        self.tokenizer, self.prompt_len, self.sentence, self.loops = tokenizer, prompt_len, sentence, loops

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)  # (B,) so far
        done = ["\n" in t.lstrip() or (self.sentence and _SENTENCE_END.search(t) is not None)
                or (self.loops and _LOOP_STOP.search(t) is not None) for t in new]
        return torch.tensor(done, device=input_ids.device)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 8,
                     do_sample: bool = False, temperature: float = 0.6, top_k: int = 70, top_p: float = 0.95,
                     add_special_tokens: bool = True, seed: int | None = None, one_sentence: bool = False,
                     prompt_lookup: int = 0, stop_loops: bool = True) -> list[str]:
    """Answers for `prompts`, generated `batch_size` at a time (greedy unless do_sample), cleaned.

    Prompts are left-padded so every row's new tokens start at the same column. A row stops at EOS
    or at a newline; `postprocess_answer` removes what a small model appends anyway.
    Pass add_special_tokens=False for prompts built with a chat template (they hold their own).
    With one_sentence a row also stops, and its answer ends, at the end of its first sentence: untrained
    instruct models answer in paragraphs, which costs minutes in an evaluation and only lowers their F1.
    With do_sample and a `seed`, the call samples from its own random stream seeded with it: the same
    prompts and seed give the same answers, and the caller's random streams are left as they were.
    With prompt_lookup=N, a greedy prompt alone in its batch is decoded by prompt lookup (transformers'
    `prompt_lookup_num_tokens`): up to N tokens that follow the last words in the prompt are drafted and the
    model checks them all in one forward pass, keeping the longest prefix it would have chosen itself.
    Extractive answers copy the context, so most drafts are kept and an answer takes fewer passes; the
    tokens are greedy decoding's, up to rounding (bf16 sums over several rows are not bit-identical to one).
    transformers drafts for one row at a time only, so batches decode token by token.
    A row that falls into a loop (a few words said four times in a row) stops there and its answer keeps one
    copy ("Carl Gustav Jacob Jacob Jacob Jacob" -> "Carl Gustav Jacob"); stop_loops=False lets it run on to
    max_new_tokens (the answer is cut the same way).
    """
    from transformers import StoppingCriteriaList

    model = unwrap(model)
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    seeded = do_sample and seed is not None
    try:
        with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                                     enabled=seeded):
            if seeded:  # the streams generate() draws from: the CPU's, or the model's GPU's
                torch.default_generator.manual_seed(seed)
                if device.type == "cuda":
                    with torch.cuda.device(device):
                        torch.cuda.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start:start + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(device)
                width = enc["input_ids"].shape[1]
                sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else \
                    dict(do_sample=False, temperature=None, top_k=None, top_p=None)
                if prompt_lookup and not do_sample and len(chunk) == 1:
                    sampling["prompt_lookup_num_tokens"] = prompt_lookup
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id,
                                     stopping_criteria=StoppingCriteriaList([_StopAtNewline(tokenizer, width, one_sentence, stop_loops)]),
                                     **sampling)
                texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)  # (B,) new tokens only
                out += [first_sentence(postprocess_answer(t)) if one_sentence else postprocess_answer(t) for t in texts]
    finally:
        tokenizer.padding_side = side
    return out
