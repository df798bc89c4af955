"""`bench train`: samples/s, tokens/s and MFU of the generator phase as `train.py` runs it (contexts built
in batches once per phase, batches padded to their longest, LM-head logits at answer positions only),
retrieval and context building included, against the per-sample step it replaced (`PerSampleStep`, in
`per_sample.py`) on the same questions, the two alternating step by step. Where the run's settings differ
from the path before them (`REFERENCE_PATH`: fp32 weights, under autocast with bf16; sdpa attention; not
compiled), ours is also timed that way (`reference_*`, `vs_reference`), in the same rotation: bf16 weights
(`bf16_weights`: the generator in bf16, AdamW on fp32 copies, master.py), eager attention (`train_attention`,
eager on CPUs) and `--compile_generator=true` (give `--warmup=3`: the untimed steps pay for compiling) are
each measured against it; `--train_attention=sdpa --bf16_weights=false` beside it, for instance, isolates
what the attention alone gains.

    python -m cozyrag_lib bench train --preset=demo --steps=20

The default generator is a randomly initialised GPT-2 of distilgpt2's shape with SmolLM2's tokenizer;
`--generator=SPEC` takes any spec. MFU = model FLOPs (`training_flops`, real tokens only) / seconds / the
matmul peak measured in the same run in the training's dtype (`matmul_peak`). The run's QA, passages and
index are used; a run without them is replaced by a small one (500 articles) built once under the
temporary folder. The original's settings apply unless given (`original_settings`: top_k 4, 10
sentences, 128-token context, batch 4, lr 5e-5, as presets/original.toml has them). Options:
`--steps=20`, `--warmup=1`, `--style=both|ours`, `--generator=SPEC`, `--fused_adamw=0` (ours with the
per-tensor AdamW instead of training's fused one), `--reference=0` (no reference path).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from .. import distributed
from ..config import coerce, read_preset
from ..errors import CozyError
from ..index import PassageIndex
from ..models import TINY_GENERATOR, load_generator, load_retriever, resolve_generator_path, training_attention
from ..train_data import PhaseBatches, item_lengths, load_train_items, prepare_phase
from ..train_setup import make_run, trains_bf16_weights
from ..train_state import Run, TrainState
from ..train_steps import generator_loss, get_batch, optimizer_step
from .common import (Stopwatch, device_name, flop_shape, matmul_peak, run_with_stages,
                     training_flops)
from .per_sample import PerSampleStep

DISTILGPT2 = "bench:distilgpt2"  # distilgpt2's shape (6 layers, 768 wide, 12 heads, 50,257 tokens), random weights
# the training settings of the project CoZyRAG grew from, as presets/original.toml gives them; a command-line value wins
ORIGINAL_KEYS = ("top_k", "train_max_sentences", "context_tokens", "max_length", "batch_size", "grad_accum",
                 "lr_generator")
# what original.toml does not set (it leaves it to the config default): the original stepped once per batch
NOT_IN_ORIGINAL_PRESET = {"grad_accum": 1}


def original_settings() -> dict[str, Any]:
    """The values of ORIGINAL_KEYS in presets/original.toml (NOT_IN_ORIGINAL_PRESET for those it lacks).

    >>> original_settings()["top_k"]
    4
    """
    preset = read_preset("original")
    return {k: coerce(k, preset[k], "preset original") if k in preset else NOT_IN_ORIGINAL_PRESET[k]
            for k in ORIGINAL_KEYS}


# the generator phase as it ran before bf16 weights, eager attention on CPUs and torch.compile: the reference
REFERENCE_PATH = {"bf16_weights": False, "train_attention": "sdpa", "compile_generator": False}


def differs_from_reference(cfg, device) -> bool:
    """Whether `cfg` trains the generator otherwise than the reference path (else there is nothing to compare)."""
    def path(c):  # the settings of REFERENCE_PATH as they resolve on `device`
        return trains_bf16_weights(c, device), training_attention(c.train_attention, device), c.compile_generator
    return path(cfg) != path(dataclasses.replace(cfg, **REFERENCE_PATH))


def bench_generator(spec: str, cfg):
    """(model, tokenizer) for `spec` as training loads it; DISTILGPT2 is built at random with SmolLM2's tokenizer."""
    if spec != DISTILGPT2:
        return load_generator(spec, cfg.model_cache, cfg.trust_remote_code)
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(resolve_generator_path(TINY_GENERATOR, cfg.model_cache),  # SmolLM2's
                                        local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(cfg.seed)
    # activation: GPT-2's tanh GELU as torch's one fused kernel ("gelu_new" is the same function in eight
    # elementwise ops forward and more backward, ~10% of a CPU step); dropout stays at GPT-2's 0.1
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=6, n_head=12,
                        activation_function="gelu_pytorch_tanh",
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config._attn_implementation = "sdpa"  # fused attention (flash / memory-efficient kernels on GPUs)
    return GPT2LMHeadModel(config), tok


def ours_step(run, rows: list[int], watch: Stopwatch) -> dict:
    """One optimizer step of the generator phase as `train_loop` runs it: the phase's cached contexts,
    padding to the longest in the batch, LM-head logits at answer positions only, differentiable penalties."""
    with watch("batch"):
        batch = get_batch(run, "generator", rows)  # tokenise prompts + answers, pad, copy to the device
    with watch("forward_backward"):
        loss, _ = generator_loss(run, batch)
        loss.backward()
    with watch("optimizer"):
        optimizer_step(run.opt_generator, run.cfg.grad_clip, run.master)
    head = int(batch["answer_mask"].sum())
    return {"lengths": batch["attention_mask"].sum(1).tolist(), "width": batch["attention_mask"].shape[1],
            "head": head, "head_processed": head, "loss": float(loss.detach())}


def step_rows(items: list[dict], cfg, n: int) -> list[list[int]]:
    """Item rows of the first `n` batches of a generator phase (length-bucketed like training; epochs as needed)."""
    if len(items) < cfg.batch_size:
        raise CozyError(f"bench train: {len(items)} training QA pairs are fewer than one batch of {cfg.batch_size}")
    batches = PhaseBatches(item_lengths(items), cfg.batch_size, 1, cfg.seed, 0)
    out, epoch = [], 0
    while len(out) < n:
        batches.set_epoch(epoch)
        out += [batches[i] for i in range(len(batches))]
        epoch += 1
    return out[:n]


def phase_rows(batches: list[list[int]]) -> list[int]:
    """The item rows a phase of these batches covers, once each."""
    return sorted({i for r in batches for i in r})


def train_config(parsed):
    """(cfg, device): the run's config with the original's settings where the command line gives none,
    bf16 autocast on GPUs unless `--precision` is given, and stages 1-3 built (or a 500-article stand-in)."""
    given = parsed.overrides
    cfg = dataclasses.replace(parsed.config(), **{k: v for k, v in original_settings().items() if k not in given})
    if "precision" not in given and cfg.device != "cpu" and torch.cuda.is_available():
        cfg = dataclasses.replace(cfg, precision="bf16")  # on GPUs bf16 autocast unless asked otherwise
    device = distributed.setup(cfg.device)
    return run_with_stages(cfg, fallback_articles=500), device


def setup_styles(cfg, device, items: list[dict], steps: int, opts: dict
                 ) -> tuple[Run, Run | None, PerSampleStep | None]:
    """Our training `Run` of a generator phase of `steps` steps; (`--reference`, where ours differs from it)
    the same on the reference path (REFERENCE_PATH); (style both) the per-sample step. Each starts from the same
    initial weights; they share the retriever and passage index."""
    pindex = PassageIndex.load(cfg.paths.index, cfg.paths.passages, retriever=cfg.retriever)
    retriever = load_retriever(cfg.retriever, str(device), cfg.trust_remote_code)
    lm, tok = bench_generator(opts["generator"], cfg)
    lm.to(device).train()
    other = copy.deepcopy(lm) if opts["style"] == "both" else None  # the same initial weights
    ref_lm = copy.deepcopy(lm) if opts["reference"] and differs_from_reference(cfg, device) else None  # before make_run re-types lm
    run = make_run(cfg, device, lm, tok, retriever, pindex, items, [("generator", steps)], TrainState(),
                   fused_adamw=bool(opts["fused_adamw"]))
    ref_cfg = dataclasses.replace(cfg, **REFERENCE_PATH)
    reference = make_run(ref_cfg, device, ref_lm, tok, retriever, pindex, items, [("generator", steps)], TrainState(),
                         fused_adamw=bool(opts["fused_adamw"])) if ref_lm is not None else None
    retriever.eval()  # as in a generator phase
    per_sample = PerSampleStep(cfg, other, tok, retriever, pindex, run.autocast) if other is not None else None
    return run, reference, per_sample


def warm_up(run: Run, reference: Run | None, per_sample: PerSampleStep | None, warm: list[list[int]]) -> None:
    """Untimed steps of every style (thread pools, allocator, kernel choice), then empty caches: the timed
    steps pay for retrieval."""
    run.phase_data = prepare_phase(run, "generator", phase_rows(warm))
    if reference:
        reference.phase_data = run.phase_data
    for r in warm:
        ours_step(run, r, Stopwatch(run.device))
        if reference:
            ours_step(reference, r, Stopwatch(run.device))
        if per_sample:
            per_sample.step([run.items[i] for i in r], Stopwatch(run.device))
    for each in (run, reference) if reference else (run,):
        each.context_cache, each.phase_data = {}, None
        each.sentence_cache.reset(0)


def timed_steps(run: Run, reference: Run | None, per_sample: PerSampleStep | None, timed: list[list[int]],
                watches: dict[str, Stopwatch]) -> dict[str, list[dict]]:
    """Step records of each style over the `timed` batches, timed in `watches` (ours, reference, per_sample)."""
    records = {k: [] for k in watches}
    with watches["ours"]("retrieval"):  # the phase's contexts: batched retrieval and sentence ranking, as prepare_phase does
        run.phase_data = prepare_phase(run, "generator", phase_rows(timed))
    if reference:  # the same contexts, at the same cost
        reference.phase_data = run.phase_data
        watches["reference"].seconds["retrieval"] = watches["ours"].seconds["retrieval"]
    steps = {"ours": lambda r, w: ours_step(run, r, w), "reference": lambda r, w: ours_step(reference, r, w),
             "per_sample": lambda r, w: per_sample.step([run.items[i] for i in r], w)}
    order = list(watches)
    for s, r in enumerate(tqdm(timed, desc="bench train", unit="step")):
        # rotate which style goes first, so load drift on a shared machine favours none
        for style in order[s % len(order):] + order[:s % len(order)]:
            records[style].append(steps[style](r, watches[style]))
    return records


def summary(steps: list[dict], w: Stopwatch, shape: dict[str, int], peak: float, prefix: str = "") -> dict:
    """Rates, MFU (useful and processed FLOPs), padding and retrieval share of one style's steps."""
    n = sum(len(x["lengths"]) for x in steps)
    tokens = sum(sum(x["lengths"]) for x in steps)
    flops = sum(training_flops(shape, x["lengths"], x["head"]) for x in steps)  # useful work
    # what the hardware did: every padded position through the model, and the LM head where it ran
    processed = sum(training_flops(shape, [x["width"]] * len(x["lengths"]), x["head_processed"]) for x in steps)
    compute = w.seconds.get("forward_backward", 0.0) + w.seconds.get("optimizer", 0.0)
    out = {"samples_per_s": n / w.total, "tokens_per_s": tokens / w.total, "mfu": flops / w.total / peak,
           "mfu_model_step": flops / compute / peak, "mfu_processed": processed / w.total / peak,
           "padding_fraction": 1 - tokens / sum(x["width"] * len(x["lengths"]) for x in steps),
           "retrieval_share": w.seconds.get("retrieval", 0.0) / w.total,
           "seconds": {k: round(v, 3) for k, v in w.seconds.items()}, "samples": n, "real_tokens": tokens,
           "loss_last": steps[-1]["loss"]}
    return {prefix + k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def bench_train(parsed) -> dict[str, Any]:
    """Generator-phase samples/s, tokens/s and MFU, counting retrieval and context building; and the same
    for the per-sample step (`PerSampleStep`) on the same questions, steps interleaved."""
    opts = parsed.options
    if opts["style"] not in ("both", "ours"):
        raise CozyError(f"bench train: --style must be both or ours, got {opts['style']!r}")
    if opts["steps"] < 1:
        raise CozyError("bench train: --steps must be at least 1")
    cfg, device = train_config(parsed)
    items = load_train_items(cfg)
    rows = step_rows(items, cfg, opts["warmup"] + opts["steps"])
    warm, timed = rows[:opts["warmup"]], rows[opts["warmup"]:]
    run, reference, per_sample = setup_styles(cfg, device, items, len(timed), opts)
    with run.autocast():
        bf16 = torch.is_autocast_enabled(device.type)
    warm_up(run, reference, per_sample, warm)

    peak_dtype = torch.bfloat16 if bf16 else torch.float32
    peak = matmul_peak(device, peak_dtype)
    shape = flop_shape(run.generator)
    watches = {k: Stopwatch(device) for k, on in (("ours", True), ("reference", reference), ("per_sample", per_sample))
               if on}
    records = timed_steps(run, reference, per_sample, timed, watches)
    peak = max(peak, matmul_peak(device, peak_dtype))  # best of both ends of the run

    result = {"benchmark": "train", "generator": opts["generator"],
              "params": sum(p.numel() for p in run.generator.parameters()), "source": str(cfg.run_dir),
              "device": device_name(device), "precision": "bf16" if bf16 else "fp32", "steps": len(timed),
              "batch_size": cfg.batch_size, "bf16_weights": run.master is not None,
              "attention": run.generator.config._attn_implementation,
              "compile_generator": cfg.compile_generator,
              **summary(records["ours"], watches["ours"], shape, peak)}
    if reference:
        result.update(summary(records["reference"], watches["reference"], shape, peak, "reference_"))
        result["vs_reference"] = round(result["samples_per_s"] / result["reference_samples_per_s"], 4)
    if per_sample:
        result.update(summary(records["per_sample"], watches["per_sample"], shape, peak, "original_"))
        result["ratio"] = round(result["samples_per_s"] / result["original_samples_per_s"], 4)
    result.update({"peak_flops": round(peak), "peak_dtype": str(peak_dtype).replace("torch.", ""),
                   "flop_count": "3 x (2 x non-embedding params x real tokens + 4 x layers x width x T^2 per sequence "
                                 "+ 2 x width x vocab x answer positions); *_mfu_processed counts every padded "
                                 "position, and the LM head wherever it ran (all positions in the original)",
                   "fused_adamw": bool(opts["fused_adamw"]),
                   "settings": {k: getattr(cfg, k) for k in (*ORIGINAL_KEYS, "grad_clip")}})
    return result
