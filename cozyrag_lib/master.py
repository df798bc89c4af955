"""bf16 weights with fp32 master copies: the generator trains in bf16 without autocast's casts.

Under bf16 autocast each matmul casts its fp32 weight to bf16 in the forward, and the bf16 weight gradient
back to fp32 in the backward; on a 2-core CPU those copies take a fifth of a generator step (`bench train`
profile in the README). With `bf16_weights` the model's parameters are bf16, so forward and backward run
without them, and AdamW steps fp32 copies ("master weights"): an update of lr 1e-4 is below bf16's
resolution (8 bits of mantissa) and would round away on the bf16 weight itself.

    master = MasterWeights(model)                   # model's parameters now bf16; master.params: fp32 copies
    opt = torch.optim.AdamW(master.params, lr=1e-4)
    loss.backward()
    master.pull_grads()                             # bf16 .grad -> fp32 .grad of the copies
    clip_grad_norm_(master.params, 1.0); opt.step(); opt.zero_grad()
    master.push()                                   # the stepped fp32 copies -> bf16 weights
    with master.fp32():                             # the full-precision weights, e.g. to save them
        model.save_pretrained(folder)

Only parameters change dtype: buffers (rotary frequencies, masks) stay as the model made them. Frozen
parameters (a LoRA run's base) become bf16 and get no copy.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class MasterWeights:
    """fp32 copies of `model`'s trainable parameters, which become bf16 (as do its frozen ones), in place."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.weights = [p for p in model.parameters() if p.requires_grad]
        self.params = [p.detach().float().clone().requires_grad_(True) for p in self.weights]
        self.grads = [torch.zeros_like(m) for m in self.params]  # fp32 gradients, one buffer reused every step
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)

    def pull_grads(self) -> None:
        """Move the model's (bf16) gradients onto the fp32 copies as fp32; the model's are dropped."""
        have = [i for i, w in enumerate(self.weights) if w.grad is not None]
        torch._foreach_copy_([self.grads[i] for i in have], [self.weights[i].grad for i in have])
        for m in self.params:
            m.grad = None
        for i in have:
            self.params[i].grad, self.weights[i].grad = self.grads[i], None

    @torch.no_grad()
    def push(self) -> None:
        """Copy the fp32 copies (just stepped) into the model's bf16 weights."""
        torch._foreach_copy_(self.weights, self.params)

    @contextlib.contextmanager
    def fp32(self):
        """Inside the block the model holds the fp32 copies (e.g. to save them): each trainable parameter is
        replaced by one over its copy's storage, and put back after. The original parameters are never
        re-typed in place, which would drop the gradient hooks DDP registered on them."""
        swap = {id(w): nn.Parameter(m.detach(), requires_grad=False) for w, m in zip(self.weights, self.params)}
        held = [(module, name, p) for module in self.model.modules() for name, p in module.named_parameters(recurse=False)
                if id(p) in swap]
        for module, name, p in held:
            setattr(module, name, swap[id(p)])  # a tied weight gets the same new parameter in both places
        try:
            yield self.model
        finally:
            for module, name, p in held:
                setattr(module, name, p)


def full_precision(master: MasterWeights | None):
    """`master.fp32()`, or nothing to do without master weights."""
    return master.fp32() if master is not None else contextlib.nullcontext()
