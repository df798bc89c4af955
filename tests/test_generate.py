"""Answer clean-up and the newline stopping criterion, on the failure cases seen in real runs."""
import pytest
import torch

from cozyrag_lib.generate import _StopAtNewline, first_sentence, generate_answers, postprocess_answer


@pytest.mark.parametrize("raw, want", [
    ("Vitamin A: a nutrient", "Vitamin A: a nutrient"),  # was cut to "Vitamin"
    ("Hepatitis A: a liver disease", "Hepatitis A: a liver disease"),
    ("Plan A: the first option", "Plan A: the first option"),
    ("Answer: Paris", "Paris"),  # a leading label goes
    ("A: Jane Austen", "Jane Austen"),
    (" a: 1813", "1813"),
    ("Paris\nQ: What is the capital of Spain?", "Paris"),  # run-on into a new prompt line
    ("Paris Q: What is the capital of Spain?", "Paris"),  # the same run-on without the newline
    ("Paris Context: Madrid is ...", "Paris"),
    ("Q: Who wrote it?\nContext:\nAusten wrote it.\nA: Jane Austen", "Jane Austen"),  # an echoed prompt
    ("Paris<|im_end|>", "Paris"),
    ("299,792,458 m/s", "299,792,458 m/s"),
    ("German-born   theoretical physicist", "German-born theoretical physicist"),
    ("QA: quality assurance", "QA: quality assurance"),  # "Q" inside a word is not a label
    # a degenerate loop (the demo's answer to "Which German mathematician lived from 1805 to 1859?") keeps one copy
    ("Carl Gustav Jacob" + " Jacob" * 45, "Carl Gustav Jacob"),
    ("the river the river the river the river flows", "the river"),  # a loop of two words, and what follows it
    ("Tora! Tora! Tora!", "Tora! Tora! Tora!"),  # three times is a title, not a loop
    ("Walla Walla, Washington", "Walla Walla, Washington"),
    ("1, 1, 2, 3, 5, 8", "1, 1, 2, 3, 5, 8"),
    ("0, 0, 0, 0, 1", "0, 0, 0, 0, 1"),  # numbers are never a loop
    ("Jacob, Jacob, Jacob, Jacob, Jacob", "Jacob"),  # the cut leaves no trailing comma
    ("the  river the river the river the river", "the river"),  # spacing does not hide a loop
])
def test_postprocess_answer(raw, want):
    assert postprocess_answer(raw) == want


def test_postprocess_answer_strips_an_echoed_prompt_prefix():
    prompt = "Q: Who?\nContext:\nAnn.\nA: "
    assert postprocess_answer(prompt + "Ann", prompt=prompt) == "Ann"


class _Tok:
    """Decodes ids as characters (0 = "\\n", 1 = "a", 2 = " ")."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join({0: "\n", 1: "a", 2: " "}[int(i)] for i in row) for row in rows]


def test_stop_at_newline_waits_for_content():
    stop = _StopAtNewline(_Tok(), prompt_len=2)  # the first two ids of each row are the prompt
    rows = torch.tensor([[1, 1, 1, 0],   # content, then a newline: done
                         [1, 1, 2, 0],   # only a space before the newline: keep going
                         [1, 1, 0, 1],   # a leading newline, then content: keep going
                         [1, 1, 1, 1]])  # no newline yet
    assert stop(rows, None).tolist() == [True, False, False, False]


@pytest.mark.parametrize("raw, want", [
    ("Paris is the capital. It lies on the Seine.", "Paris is the capital."),
    ("The U.S. Army was founded in 1775. Later it grew.", "The U.S. Army was founded in 1775."),  # no cut at U.S.
    ("Dr. Smith wrote it in 1901! Then more.", "Dr. Smith wrote it in 1901!"),
    ('He said "yes." Then left.', 'He said "yes."'),
    ("299,792,458 m/s", "299,792,458 m/s"),  # one sentence: all of it
    ("It ends here.", "It ends here."),
])
def test_first_sentence(raw, want):
    assert first_sentence(raw) == want


class _Words:
    """Decodes ids as words (0 = "Paris", 1 = " is", 2 = ".", 3 = " It")."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join({0: "Paris", 1: " is", 2: ".", 3: " It"}[int(i)] for i in row) for row in rows]


def test_stop_at_a_loop_unless_told_not_to():
    rows = torch.tensor([[0, 3, 3, 3, 3, 1],   # "Paris It It It It is": a loop, and a word after it
                         [0, 3, 3, 3, 1, 1],   # "Paris It It It is is": three times
                         [0, 1, 3, 3, 3, 3]])  # "Paris is It It It It": the fourth may still grow ("Itself")
    assert _StopAtNewline(_Words(), 0)(rows, None).tolist() == [True, False, False]
    assert _StopAtNewline(_Words(), 0, loops=False)(rows, None).tolist() == [False, False, False]


def test_stop_at_the_first_sentence_only_when_asked():
    rows = torch.tensor([[0, 1, 2, 3],   # "Paris is. It": a second sentence began
                         [0, 1, 2, 2]])  # "Paris is..": not yet
    assert _StopAtNewline(_Words(), 0, sentence=True)(rows, None).tolist() == [True, False]
    assert _StopAtNewline(_Words(), 0)(rows, None).tolist() == [False, False]


_PROMPTS = ["Q: Who wrote Pride and Prejudice?\nContext: Pride and Prejudice is a novel by Jane Austen, published in 1813.\nA:",
            "Q: What is the capital of France?\nContext: Paris is the capital and largest city of France.\nA:"]


def _answers_and_passes(model, tok, prompts, batch_size, **kw):
    """(answers, forward passes of the model, the token ids it generated, uncleaned) for one generate_answers call."""
    passes, generated = [], []
    hook = model.register_forward_hook(lambda *_: passes.append(1))
    model.generate = lambda *a, _real=model.generate, **k: generated.append(_real(*a, **k)) or generated[-1]
    try:
        answers = generate_answers(model, tok, prompts, 24, batch_size, **kw)
        return answers, len(passes), [row.tolist() for out in generated for row in out]
    finally:
        hook.remove()
        del model.generate


def test_prompt_lookup_gives_the_greedy_answer_in_fewer_passes(tiny_generator):
    """The random tiny GPT-2 answers in loops ("ss ss ss ..."), left to run here (stop_loops=False): drafts copied
    from what is already there are accepted, so the 24 tokens take fewer forward passes than 24, and the answer
    is greedy decoding's."""
    model, tok = tiny_generator
    for prompt in _PROMPTS:
        plain, plain_passes, plain_ids = _answers_and_passes(model, tok, [prompt], 1, stop_loops=False)
        drafted, drafted_passes, drafted_ids = _answers_and_passes(model, tok, [prompt], 1, prompt_lookup=7,
                                                                   stop_loops=False)
        assert drafted_ids == plain_ids and drafted == plain  # every token, not only the answer the loop cut leaves
        assert plain_passes == 24 and drafted_passes < plain_passes / 2


def test_a_looping_answer_stops_early_and_keeps_one_copy(tiny_generator):
    model, tok = tiny_generator
    for prompt in _PROMPTS:
        ran_on, ran_on_passes, ran_on_ids = _answers_and_passes(model, tok, [prompt], 1, stop_loops=False)
        stopped, stopped_passes, stopped_ids = _answers_and_passes(model, tok, [prompt], 1)
        assert stopped == ran_on and stopped[0]  # the same answer: the loop is cut either way
        assert ran_on_passes == 24 and stopped_passes < 24
        assert stopped_ids[0] == ran_on_ids[0][:len(stopped_ids[0])]  # greedy's tokens, fewer of them


def test_prompt_lookup_leaves_batches_and_sampling_token_by_token(tiny_generator):
    model, tok = tiny_generator
    plain, plain_passes, plain_ids = _answers_and_passes(model, tok, _PROMPTS, 2, stop_loops=False)
    drafted, drafted_passes, drafted_ids = _answers_and_passes(model, tok, _PROMPTS, 2, prompt_lookup=7, stop_loops=False)
    assert drafted_ids == plain_ids and drafted_passes == plain_passes == 24  # two rows: transformers drafts for one only
    sampled = [_answers_and_passes(model, tok, _PROMPTS[:1], 1, prompt_lookup=n, do_sample=True, seed=1, stop_loops=False)
               for n in (0, 7)]
    assert sampled[1] == sampled[0]  # sampling is not drafted: the same sample in the same number of passes
