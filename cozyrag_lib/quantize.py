"""Int8 weight-only Linear layers for answering on a CPU (config `answer_quantization`).

Decoding an answer reads every weight once per token at batch 1, so on a CPU it runs at memory speed:
int8 weights are half the bytes of bf16 ones. `Int8Linear` keeps each weight as int8 with one scale per
output row (symmetric, max |w| / 127) and multiplies few-row inputs (decoded tokens) with torch's
int8-weight kernel; inputs of many rows (the prompt pass, where the matmul is compute-bound) use a bf16
copy of the weight. Activations stay bf16 (nothing like dynamic activation quantisation, which cost
SmolLM2 half its SQuAD EM here; README, Speed).

    >>> model = quantize_int8(model)          # doctest: +SKIP   every nn.Linear and GPT-2 Conv1D, the LM head too
"""
from __future__ import annotations

import torch
from torch import nn

from .models import is_peft

DECODE_ROWS = 8  # inputs of at most this many rows (tokens x batch) take the int8 kernel


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored int8 per output row (and bf16 for inputs of many rows)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()  # (out, in)
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # the kernel's dtype, then round to it
        self.register_buffer("qweight", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("weight", w.to(torch.bfloat16))  # for the prompt pass
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    @classmethod
    def from_module(cls, module: nn.Module) -> "Int8Linear":
        if isinstance(module, nn.Linear):
            return cls(module.weight, module.bias)
        return cls(module.weight.t(), module.bias)  # transformers' Conv1D (GPT-2): weight is (in, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if rows.shape[0] <= DECODE_ROWS:
            y = torch._weight_int8pack_mm(rows.contiguous(), self.qweight, self.scale.to(rows.dtype))
        else:
            y = nn.functional.linear(rows, self.weight.to(rows.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's linear layers


def quantize_int8(model: nn.Module) -> nn.Module:
    """`model` for answering, in bf16, its Linear (and Conv1D) layers swapped for `Int8Linear`, in place.

    A peft model is merged into its base first. Inference only: the int8 layers have no gradients.
    """
    if is_peft(model):
        model = model.merge_and_unload()
    model.to(torch.bfloat16).eval()
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if _is_linear(child)]
    for parent, name, child in swaps:
        setattr(parent, name, Int8Linear.from_module(child))
    return model


def is_int8(model: nn.Module) -> bool:
    """True when `model` answers with `Int8Linear` layers."""
    return any(isinstance(m, Int8Linear) for m in model.modules())
