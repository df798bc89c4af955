"""Benchmarks at tiny sizes: each prints one JSON line with its keys and sane values (no timing asserts)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cozyrag_lib import bench
from cozyrag_lib.bench.common import flop_shape, matmul_peak, recall_at, training_flops
from cozyrag_lib.bench.per_sample import PerSampleStep
from cozyrag_lib.bench.scale import scale_vectors
from cozyrag_lib.bench.train import original_settings
from cozyrag_lib.errors import CozyError
from cozyrag_lib.models import use_int8


def run_bench(capsys, *args: str) -> dict:
    """bench.cli(args) in-process; the single JSON line it printed on stdout."""
    assert bench.cli(list(args)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def run_args(cfg) -> list[str]:
    return ["--preset=tiny", f"--out_root={cfg.out_root}", f"--run_name={cfg.run_name}", f"--model_cache={cfg.model_cache}"]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ---- helpers ----------------------------------------------------------------------------------


def test_training_flops_counts_body_attention_and_head():
    shape = {"layers": 2, "width": 4, "vocab": 10, "body_params": 100}
    # forward: 2*100*3 (weights) + 4*2*4*9 (attention) + 2*4*10*2 (head at 2 positions); training = 3x
    assert training_flops(shape, [3], head_positions=2) == 3 * (600 + 288 + 160)
    # two sequences cost their sum; the head term only grows with head positions
    assert training_flops(shape, [3, 5], 0) == training_flops(shape, [3], 0) + training_flops(shape, [5], 0)


def test_flop_shape_leaves_out_embeddings_and_head(tiny_generator):
    lm, _ = tiny_generator
    shape = flop_shape(lm)
    c = lm.config
    per_layer = 12 * c.n_embd ** 2 + 13 * c.n_embd  # attention + MLP weights and biases, two layer norms
    assert shape["layers"] == c.n_layer and shape["width"] == c.n_embd and shape["vocab"] == c.vocab_size
    assert shape["body_params"] == c.n_layer * per_layer + 2 * c.n_embd  # + the final layer norm


def test_matmul_peak_is_a_rate():
    assert positive(matmul_peak(torch.device("cpu"), torch.float32, n=128, repeats=2))


@pytest.mark.parametrize("budget_s, largest", [(0.0, 256), (1e9, 2048)])
def test_matmul_peak_sizes_its_products_to_the_time_they_take(monkeypatch, budget_s, largest):
    """On CPU the product grows from 256 while the next size fits the budget, up to 2048: an emulated dtype
    (bf16 without AMX or AVX512-BF16, ~1 GFLOP/s) stops small instead of taking minutes."""
    sizes, matmul = [], torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b: sizes.append(a.shape[0]) or matmul(a, b))
    assert positive(matmul_peak(torch.device("cpu"), torch.float32, repeats=1, budget_s=budget_s))
    assert sizes[0] == 256 and max(sizes) == sizes[-1] == largest


def test_original_settings_come_from_the_original_preset():
    """The original's training settings as `bench train` applies them (presets/original.toml; grad_accum,
    which the preset leaves to the default, pinned at 1)."""
    assert original_settings() == {"top_k": 4, "train_max_sentences": 10, "context_tokens": 128, "max_length": 256,
                                   "batch_size": 4, "grad_accum": 1, "lr_generator": 5e-5}


def test_scale_vectors_are_unit_noisy_copies():
    base = np.eye(4, dtype=np.float32)
    x = scale_vectors(base, 10, noise=0.1, seed=0)
    assert x.shape == (10, 4)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert (x.argmax(1) == np.arange(10) % 4).all()  # small noise: each copy stays nearest its source
    np.testing.assert_array_equal(x, scale_vectors(base, 10, noise=0.1, seed=0))  # seeded
    assert recall_at(np.array([[1, 2], [3, -1]]), np.array([[2, 1], [3, 4]])) == 0.75


def test_per_sample_argmax_penalties_are_constants(tiny_run, tiny_generator):
    """The per-sample step's penalties come from argmax tokens: a float, no gradient (what it stands for)."""
    lm, tok = tiny_generator
    step = PerSampleStep(tiny_run, lm, tok, retriever=None, pindex=None, autocast=None)
    items = [{"question": "Who was Ann?", "answers": ["a painter"]}, {"question": "What is X?", "answers": ["a thing"]}]
    batch = step.batch(items, ["Ann was a painter.", ""])
    assert batch["input_ids"].shape == (2, tiny_run.max_length)  # padded to max_length, whatever the length
    assert int(batch["attention_mask"].sum()) == sum(end for _, end in batch["spans"])
    assert (batch["labels"] != -100).sum() == sum(end - start for start, end in batch["spans"])
    logits = torch.randn(2, tiny_run.max_length, lm.config.vocab_size, requires_grad=True)
    pen = step.argmax_penalties(logits, batch)
    assert isinstance(pen, float) and pen >= 0


# ---- the benchmarks ---------------------------------------------------------------------------


def test_bench_train_reports_both_styles(tiny_run, capsys):
    r = run_bench(capsys, "train", *run_args(tiny_run), "--generator=tiny:gpt2", "--steps=2", "--threads=1")
    for key in ("samples_per_s", "tokens_per_s", "original_samples_per_s", "original_tokens_per_s", "ratio", "mfu",
                "original_mfu", "mfu_model_step", "original_mfu_processed", "peak_flops"):
        assert positive(r[key]), key
    assert r["mfu"] < 1.0 and r["original_mfu"] < 1.0
    assert r["samples"] == r["original_samples"] == 2 * tiny_run.batch_size
    assert r["real_tokens"] > 0 and r["original_real_tokens"] > 0
    # the per-sample step pads to max_length, ours to the longest in the batch
    assert 0 <= r["padding_fraction"] < r["original_padding_fraction"] < 1
    assert 0 < r["retrieval_share"] < 1 and 0 < r["original_retrieval_share"] < 1
    assert set(r["seconds"]) == {"retrieval", "batch", "forward_backward", "optimizer"}
    assert r["source"] == str(tiny_run.run_dir) and r["steps"] == 2 and r["threads"] == 1
    assert r["settings"]["top_k"] == tiny_run.top_k


def test_bench_train_times_bf16_weights_beside_the_autocast_reference(tiny_run, capsys):
    """Under bf16 ours trains bf16 weights with fp32 copies; the reference is the same step with fp32 weights under
    autocast and sdpa attention, on the same batches; --reference=0 leaves it out. In fp32 the reference is timed
    only where ours differs from it (here: eager attention)."""
    args = ["train", *run_args(tiny_run), "--generator=tiny:gpt2", "--steps=2", "--threads=1", "--style=ours",
            "--precision=bf16"]
    r = run_bench(capsys, *args)
    assert r["precision"] == "bf16" and r["bf16_weights"] is True
    for key in ("samples_per_s", "reference_samples_per_s", "vs_reference", "reference_mfu"):
        assert positive(r[key]), key
    assert r["vs_reference"] == pytest.approx(r["samples_per_s"] / r["reference_samples_per_s"], abs=1e-3)
    assert r["samples"] == r["reference_samples"] == 2 * tiny_run.batch_size
    assert r["real_tokens"] == r["reference_real_tokens"]  # the same questions and contexts
    assert not any(k.startswith("original_") for k in r)
    r = run_bench(capsys, *args, "--reference=0")
    assert not any(k.startswith("reference_") for k in r) and "vs_reference" not in r
    r = run_bench(capsys, *args[:-1], "--precision=fp32", "--train_attention=sdpa")  # the reference path itself
    assert r["bf16_weights"] is False and r["attention"] == "sdpa" and "vs_reference" not in r
    r = run_bench(capsys, *args[:-1], "--precision=fp32")  # fp32 weights, eager attention (auto, on a CPU)
    assert r["bf16_weights"] is False and r["attention"] == "eager" and positive(r["vs_reference"])
    assert r["real_tokens"] == r["reference_real_tokens"]


def test_bench_train_rejects_bad_options(tiny_run):
    with pytest.raises(CozyError, match="--style must be both or ours"):
        bench.cli(["train", *run_args(tiny_run), "--style=fast"])
    with pytest.raises(CozyError, match="--steps must be at least 1"):
        bench.cli(["train", *run_args(tiny_run), "--steps=0"])


def test_bench_ask_reports_latency_percentiles(tiny_run, capsys):
    r = run_bench(capsys, "ask", *run_args(tiny_run), "--questions=3", "--warmup=1", "--threads=1")
    assert r["questions"] == 3 and r["run"] == f"base:{tiny_run.run_name}"
    for key in ("p50_s", "p95_s", "mean_s", "retrieve_s", "context_s", "generate_s"):
        assert positive(r[key]), key
    assert r["p50_s"] <= r["p95_s"] and r["retrieve_s"] + r["context_s"] + r["generate_s"] <= r["mean_s"] * 1.05
    # the run's path (answer_quantization auto: int8 on a CPU fast at bf16, fp32 elsewhere) beside the unquantised
    # reference, in turn
    ours = "int8" if use_int8("auto", torch.device("cpu")) else "float32"
    assert (r["generator_weights"], r["reference_generator_weights"]) == (ours, "float32")
    assert (r["prompt_lookup"], r["reference_prompt_lookup"]) == (3, 0)  # prompt lookup: ours only
    assert (r["sentence_vectors"], r["reference_sentence_vectors"]) == (True, False)  # stored vectors: ours only
    assert positive(r["reference_p50_s"]) and r["p50_ratio"] == pytest.approx(r["p50_s"] / r["reference_p50_s"], abs=1e-3)
    assert 0 <= r["answers_agree"] <= 1


def test_bench_ask_without_reference_times_one_path(tiny_run, capsys):
    r = run_bench(capsys, "ask", *run_args(tiny_run), "--questions=2", "--warmup=1", "--threads=1",
                  "--reference=", "--answer_quantization=none")
    assert r["generator_weights"] == "float32" and r["questions"] == 2
    assert not any(k.startswith("reference") or k.endswith("_ratio") for k in r)


def test_bench_scale_small(tiny_run, capsys):
    r = run_bench(capsys, "scale", *run_args(tiny_run), "--n=20000", "--queries=40", "--nprobes=4,16",
                  "--k_factors=4", "--train=8192", "--threads=1")
    assert r["n"] == 20000 and r["dim"] == 384 and r["factory"] == "IVF128,PQ48,Refine(Flat)"
    assert "embeddings.npy tiled" in r["vectors"]
    assert r["ivfpq_bytes"] < r["index_bytes"] and r["flat_bytes"] == 20000 * 384 * 4
    for key in ("build_s", "rss_bytes", "peak_rss_bytes", "flat_ms_per_query", "ms_per_query"):
        assert positive(r[key]), key
    rows = {(s["nprobe"], s["k_factor"]): s for s in r["search"]}
    assert set(rows) == {(4, 0), (4, 4), (16, 0), (16, 4)}
    for s in r["search"]:
        assert 0 < s["recall_at_10"] <= 1 and s["ms_per_query"] > 0
    # re-ranking with the stored vectors never loses recall against the PQ codes alone
    assert rows[(16, 4)]["recall_at_10"] >= rows[(16, 0)]["recall_at_10"]
    assert r["recall_at_10"] == r["best"]["recall_at_10"]


# ---- device copies ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU: the pinned-memory path is GPU-only"))])
def test_to_device_moves_tensors_and_keeps_the_rest(device):
    from cozyrag_lib.retrieval import to_device

    batch = {"input_ids": torch.arange(6).reshape(2, 3), "mask": torch.ones(2, 3, dtype=torch.bool), "eos_id": 2}
    out = to_device(batch, device)
    assert out["eos_id"] == 2 and out["input_ids"].device.type == device
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(out["input_ids"].cpu(), batch["input_ids"]) and out["mask"].dtype == torch.bool
