"""Int8 weights for answering (`answer_quantization`): the layer's arithmetic, the swap over a whole model
(GPT-2's Conv1D and a Llama-shaped model's Linear layers), and which pipelines RAG.load quantises."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cozyrag_lib import CozyError, RAG
from cozyrag_lib.config import load_config
from cozyrag_lib.models import use_bf16, use_int8
from cozyrag_lib.quantize import DECODE_ROWS, Int8Linear, is_int8, quantize_int8


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("rows", [1, DECODE_ROWS, 40])  # the int8 kernel (decoding) and the bf16 copy (prompts)
def test_int8_linear_matches_the_float_layer(rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    q = Int8Linear.from_module(lin)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (96, 64) and q.scale.shape == (96,)
    # per output row: the largest weight maps to +-127, and int8 x scale gives the weight back to half a step
    assert torch.equal(q.qweight.abs().amax(dim=1), torch.full((96,), 127, dtype=torch.int8))
    w_back = q.qweight.float() * q.scale.float()[:, None]
    assert bool(((w_back - lin.weight.detach()).abs() <= q.scale.float()[:, None] * 0.51).all())
    x = torch.randn(2, rows, 64)
    y = q(x)
    assert y.shape == (2, rows, 96) and y.dtype == torch.bfloat16
    assert relative_error(y, lin(x)) < 0.02


def test_quantize_swaps_every_linear_of_a_llama_model_and_keeps_its_greedy_answer():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
        q = quantize_int8(model)
        assert is_int8(q) and not any(isinstance(m, torch.nn.Linear) for m in q.modules())
        assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 2 * 7 + 1  # q k v o gate up down, the head
        assert relative_error(q(ids).logits, ref) < 0.05  # the prompt pass: bf16 copy
        step = q(ids[:, :1]).logits  # one row: the int8 kernel
        assert relative_error(step, ref[:, :1]) < 0.05


def test_quantize_handles_gpt2_conv1d(tiny_generator):
    model, tok = tiny_generator
    ids = tok("Q: Who was Ada Lovelace?\nA:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.eval()(ids[:, :4]).logits
        import copy
        q = quantize_int8(copy.deepcopy(model))
        assert not any(type(m).__name__ == "Conv1D" for m in q.modules())
        assert relative_error(q(ids[:, :4]).logits, ref) < 0.05


def test_rag_load_quantises_by_answer_quantization(tiny_run):
    cpu = torch.device("cpu")
    auto = RAG.load(f"base:{tiny_run.run_dir}")  # auto: int8 where this CPU is fast at bf16
    assert is_int8(auto.generator) == use_bf16("auto", cpu) == use_int8("auto", cpu)
    forced = RAG.load(f"base:{tiny_run.run_dir}", answer_quantization="int8")
    none = RAG.load(f"base:{tiny_run.run_dir}", answer_quantization="none")
    assert is_int8(forced.generator) and not is_int8(none.generator)
    out = forced.answer("Who was Abraham Lincoln?", top_k=2)
    assert isinstance(out["answer"], str) and out["passages"][0]["title"] == "Abraham Lincoln"


def test_answer_quantization_values_are_checked():
    with pytest.raises(CozyError, match="answer_quantization must be auto, int8 or none, got 'int4'"):
        load_config("tiny", {"answer_quantization": "int4"})
    with pytest.raises(CozyError, match="answer_quantization=int8 runs on CPUs only"):
        use_int8("int8", torch.device("cuda"))
    assert not use_int8("auto", torch.device("cuda")) and not use_int8("none", torch.device("cpu"))
