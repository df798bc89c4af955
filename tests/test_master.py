"""bf16 weights with fp32 master copies (master.py): dtypes, the fp32 view, updates below bf16's resolution,
the autocast loss curve (a bf16 training run that saves the fp32 weights: test_train.py)."""
from __future__ import annotations

import pytest
import torch

from cozyrag_lib.master import MasterWeights
from cozyrag_lib.train_steps import optimizer_step


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def test_weights_become_bf16_with_fp32_copies_and_buffers_keep_their_dtype():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.dtype for n, b in model.named_buffers()}
    master = MasterWeights(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert {n: b.dtype for n, b in model.named_buffers()} == buffers  # rotary frequencies stay fp32
    assert any(d == torch.float32 for d in buffers.values())
    assert len(master.params) == len(before) and all(m.dtype == torch.float32 for m in master.params)
    assert all(torch.equal(m, before[n]) for m, n in zip(master.params, before))
    with master.fp32() as m:
        assert m is model and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # bf16 again after the block


def test_the_fp32_view_keeps_ties_and_gives_back_the_same_parameters():
    """GPT-2 ties its LM head to the embedding: one fp32 parameter in both places inside the block; after it the
    original bf16 parameter objects (those DDP hooked) are back, never re-typed in place."""
    model = tiny_gpt2()
    master = MasterWeights(model)
    originals = list(model.parameters())
    tied = model.transformer.wte.weight
    with master.fp32():
        assert model.lm_head.weight is model.transformer.wte.weight
        assert model.lm_head.weight.dtype == torch.float32
        assert model.transformer.wte.weight.data_ptr() == master.params[originals.index(tied)].data_ptr()
        assert {n: p.dtype for n, p in model.state_dict().items() if p.is_floating_point()} == \
            {n: torch.float32 for n, p in model.state_dict().items() if p.is_floating_point()}
    after = list(model.parameters())
    assert len(after) == len(originals) and all(a is b for a, b in zip(after, originals))
    assert all(p.dtype == torch.bfloat16 for p in after) and model.lm_head.weight is tied


def test_frozen_parameters_get_no_copy():
    model = tiny_gpt2()
    model.transformer.wte.requires_grad_(False)  # tied with the LM head: one parameter
    master = MasterWeights(model)
    assert len(master.params) == sum(1 for p in model.parameters() if p.requires_grad)
    assert model.transformer.wte.weight.dtype == torch.bfloat16


def test_updates_below_bf16_resolution_accumulate_in_the_fp32_copy():
    """A weight of 1.0 and steps of 1e-4: each rounds away in bf16 (its spacing at 1.0 is 2^-7), so plain bf16
    weights never move; the fp32 copy adds them up, and the bf16 weight follows once the sum shows."""
    w = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(w.weight)
    plain = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    torch.nn.init.ones_(plain.weight)
    master = MasterWeights(w)
    opt = torch.optim.SGD(master.params, lr=1e-4)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=1e-4)
    x = torch.ones(1, 1, dtype=torch.bfloat16)
    for _ in range(200):
        w(x).sum().backward()  # gradient 1: each step subtracts lr
        optimizer_step(opt, 0.0, master)
        plain(x).sum().backward()
        optimizer_step(opt_plain, 0.0)
    assert float(plain.weight.detach()) == 1.0
    assert float(master.params[0].detach()) == pytest.approx(1 - 200e-4, abs=1e-5)  # fp32 sums of 1e-4
    assert float(w.weight.detach()) == pytest.approx(0.98, abs=2 ** -7)  # the bf16 weight is the copy, rounded  # the bf16 weight is the copy, rounded


def train_curve(model, master: bool, steps: int = 30) -> list[float]:
    """Losses of AdamW steps on a fixed batch: bf16 weights with master copies, or fp32 weights under autocast."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (4, 24), generator=g)
    m = MasterWeights(model) if master else None
    opt = torch.optim.AdamW(m.params if m else model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer_step(opt, 1.0, m)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_bf16_weights_follow_the_autocast_loss_curve(make):
    ref, got = train_curve(make(), master=False), train_curve(make(), master=True)
    assert ref[-1] < 0.6 * ref[0]  # the steps learn the batch
    assert got == pytest.approx(ref, rel=0.02)  # within 0.4% here
