"""LoRA (lora_r > 0): only the adapters train and the loss falls, a resumed run ends where an uninterrupted one
does, final/ holds an adapter that RAG.load answers with, and lora_merge writes a folder plain transformers loads.
Tiny runs of the tiny preset, trained in this process (seconds each)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_stages
from cozyrag_lib import lora, train
from cozyrag_lib.config import load_config
from cozyrag_lib.errors import CozyError
from cozyrag_lib.jsonio import read_jsonl
from cozyrag_lib.models import TINY_GENERATOR, load_generator
from cozyrag_lib.paths import RunPaths
from cozyrag_lib.rag import RAG
from cozyrag_lib.train_setup import setup_run

STAGE_ARGS = dict(max_articles=40, chunk_max_tokens=64)
# a high learning rate: four steps must move a rank-4 adapter far enough to lower the validation loss
RUN_ARGS = dict(lora_r=4, lora_alpha=8, lr_generator=1e-2, warmup_steps=0, max_train_qa=16, max_val_qa=8,
                val_questions=[], max_new_tokens=4, eval_every=100, checkpoint_every=2, retriever_candidates=3)


@pytest.fixture(scope="module")
def stages(tmp_path_factory, model_cache):
    return tiny_stages(tmp_path_factory.mktemp("lora") / "runs", model_cache, **STAGE_ARGS)


def run_config(stages, name: str, **kw):
    """The config of a new run whose folder holds copies of the stage 1-3 artefacts."""
    for part in ("qa", "passages", "index"):
        shutil.copytree(stages.run_dir / part, Path(stages.out_root) / name / part)
    return load_config("tiny", out_root=stages.out_root, run_name=name, model_cache=stages.model_cache,
                       **{**STAGE_ARGS, **RUN_ARGS, **kw})


def train_here(cfg, resume: bool = False):
    """Train in this process; returns the Run, its models as training left them."""
    run = setup_run(cfg, torch.device("cpu"), resume)
    try:
        train.train_loop(run)
    finally:
        run.log.close()
    return run


@pytest.fixture(scope="module")
def lora_run(stages):
    """generator, retriever, generator phases of 2 steps, with LoRA adapters on the generator."""
    cfg = run_config(stages, "lora", phases=["generator", "retriever", "generator"], max_steps_per_phase=2)
    return train_here(cfg)


@pytest.fixture(scope="module")
def merged_run(stages):
    """4 generator steps with adapter dropout and lora_merge: the uninterrupted reference of the resume test."""
    return train_here(run_config(stages, "merged", phases=["generator"], max_steps_per_phase=4, lora_dropout=0.1,
                                 lora_merge=True))


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(RunPaths(run_dir).metrics)


def logits(model, tokenizer, text: str = "Q: What is anarchism?\nContext:\nA: ") -> torch.Tensor:
    """(1, T, V) full-sequence logits, eval mode, no grad."""
    ids = tokenizer(text, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**ids).logits


# ----------------------------------------------------------------------------------------------
# config and set-up


@pytest.mark.parametrize("bad", [{"lora_r": -1}, {"lora_alpha": 0}, {"lora_dropout": 1.0}, {"lora_dropout": -0.1}])
def test_bad_lora_values_are_one_line_errors(bad):
    with pytest.raises(CozyError, match=f"config: {next(iter(bad))} must") as e:
        load_config("tiny", **bad)
    assert "\n" not in str(e.value)


def test_lora_targets_come_from_peft_or_a_guess_by_name(model_cache):
    gpt2, _ = load_generator(TINY_GENERATOR, model_cache)
    assert lora.lora_targets(gpt2) == ["c_attn"] and lora.lora_targets(gpt2, ["c_fc"]) == ["c_fc"]

    class Attention(nn.Module):  # an architecture peft has no default for, with Llama-style projection names
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    class Unknown(nn.Module):
        config = type("Config", (), {"model_type": "mystery-lm"})()

        def __init__(self, attention: nn.Module):
            super().__init__()
            self.attn = attention

    assert lora.lora_targets(Unknown(Attention())) == ["q_proj", "v_proj"]
    with pytest.raises(CozyError, match="mystery-lm: peft has no default LoRA targets.*lora_targets="):
        lora.lora_targets(Unknown(nn.Linear(4, 4)))
    with pytest.raises(CozyError, match="lora_targets=nope: Target modules"):
        lora.add_lora(gpt2, load_config("tiny", lora_r=4, lora_targets=["nope"]))


# ----------------------------------------------------------------------------------------------
# training


def test_lora_training_lowers_the_loss_and_moves_only_the_adapters(lora_run, model_cache):
    rows = read_metrics(lora_run.cfg.run_dir)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 4 and val[-1] < val[0], val  # step 0, then after each phase
    gen = lora_run.generator
    trainable = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt_params = [p for g in lora_run.opt_generator.param_groups for p in g["params"]]
    assert len(opt_params) == len(trainable) == 4  # A and B of c_attn in 2 layers: AdamW holds nothing else

    base, _ = load_generator(TINY_GENERATOR, model_cache)
    start = base.state_dict()
    trained = gen.get_base_model().state_dict()
    frozen = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert frozen.keys() == start.keys()
    assert all(torch.equal(frozen[k], start[k]) for k in start)  # the base weights bit for bit
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert len(lora_b) == 2 and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: the adapters moved

    ckpt = RunPaths(lora_run.cfg.run_dir).checkpoint / "generator"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in ckpt.iterdir()}
    assert not (ckpt / "model.safetensors").exists()  # the checkpoint holds the adapter alone
    saved = load_file(ckpt / "adapter_model.safetensors")
    assert len(saved) == 4 and all("lora_" in k for k in saved)


def test_resume_ends_with_the_uninterrupted_adapters_and_losses(stages, merged_run, monkeypatch):
    """Stopped after the step-2 checkpoint, resumed: adapter, AdamW state, losses and the merged model end as in
    the uninterrupted run (adapter dropout and GPT-2's dropout draw from the restored random stream)."""

    class Stop(Exception):
        pass

    save = train.save_checkpoint

    def save_then_stop(run):
        save(run)
        raise Stop

    name = "resumed"
    cfg = run_config(stages, name, phases=["generator"], max_steps_per_phase=4, lora_dropout=0.1, lora_merge=True)
    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        train_here(cfg)
    monkeypatch.setattr(train, "save_checkpoint", save)
    assert torch.load(RunPaths(cfg.run_dir).checkpoint / "state.pt", weights_only=True)["step"] == 2
    train_here(cfg, resume=True)

    ref, got = RunPaths(merged_run.cfg.run_dir), RunPaths(cfg.run_dir)
    a, b = (load_file(p.checkpoint / "generator" / "adapter_model.safetensors") for p in (ref, got))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opts = [torch.load(p.checkpoint / "optimizers.pt", weights_only=True)["generator"]["state"] for p in (ref, got)]
    assert len(opts[0]) == 4 and opts[0].keys() == opts[1].keys()
    assert all(torch.equal(opts[0][i][k], opts[1][i][k]) for i in opts[0] for k in ("step", "exp_avg", "exp_avg_sq"))
    losses = [[(r["step"], r["loss"]) for r in read_metrics(p.root) if "loss" in r] for p in (ref, got)]
    assert [s for s, _ in losses[0]] == [1, 2, 3, 4] and losses[1] == losses[0]
    a, b = (load_file(p.final_generator / "model.safetensors") for p in (ref, got))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a LoRA checkpoint resumed as full fine-tuning is refused before the models load
    with pytest.raises(CozyError, match=r"a checkpoint of a run with lora_r=4; resume with --lora_r=4"):
        setup_run(load_config(None, {**cfg.to_dict(), "lora_r": 0, "lora_merge": False}), torch.device("cpu"), True)


# ----------------------------------------------------------------------------------------------
# final/: the adapter, or the merged model


def test_final_adapter_loads_in_rag_with_the_trained_logits(lora_run):
    final = RunPaths(lora_run.cfg.run_dir).final_generator
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    rag = RAG.load(lora_run.cfg.run_dir, device="cpu", answer_quantization="none")
    assert lora.is_peft(rag.generator)
    # training ran its generator steps eager (train_attention auto, on a CPU) and ended under the attention it
    # loaded with, as the saved model loads: the same logits to the bit
    assert lora_run.generator.config._attn_implementation == rag.generator.config._attn_implementation
    assert torch.equal(logits(rag.generator, rag.tokenizer), logits(lora_run.generator, lora_run.tokenizer))
    out = rag.answer("What is anarchism?")
    assert isinstance(out["answer"], str) and out["passages"]


def test_base_models_of_a_run_on_an_adapter_apply_it_once(lora_run):
    """base:RUN of a run whose generator is a LoRA run's final/generator (an adapter folder) answers with that
    adapter on its own base, once: the logits of the model that trained it."""
    final = RunPaths(lora_run.cfg.run_dir).final_generator
    rag = RAG.load(f"base:{lora_run.cfg.run_dir}", device="cpu", answer_quantization="none", generator=str(final))
    assert torch.equal(logits(rag.generator, rag.tokenizer), logits(lora_run.generator, lora_run.tokenizer))


def test_lora_merge_writes_a_plain_transformers_model(merged_run):
    from transformers import AutoModelForCausalLM

    final = RunPaths(merged_run.cfg.run_dir).final_generator
    assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(final)
    assert not lora.is_peft(plain) and not any("lora_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain, merged_run.tokenizer), logits(merged_run.generator, merged_run.tokenizer),
                               rtol=1e-5, atol=1e-5)
    assert lora.is_peft(merged_run.generator)  # the model in training kept its adapters: the merge was on a copy


def test_lora_without_peft_installed_is_a_one_line_error(model_cache, monkeypatch):
    import sys

    gpt2, _ = load_generator(TINY_GENERATOR, model_cache)
    monkeypatch.setitem(sys.modules, "peft", None)  # what an environment without peft raises on import
    with pytest.raises(CozyError, match=r"lora_r=4 needs peft: pip install peft") as e:
        lora.add_lora(gpt2, load_config("tiny", lora_r=4))
    assert "\n" not in str(e.value)


def test_a_lora_final_as_the_generator_of_a_new_run_trains_merged(lora_run):
    """generator = a LoRA run's final/generator (an adapter folder): the new run trains every weight of the
    adapter merged into its base, which answers as the adapter model did."""
    from cozyrag_lib.train_setup import load_models

    final = RunPaths(lora_run.cfg.run_dir).final_generator
    cfg = load_config(None, {**lora_run.cfg.to_dict(), "generator": str(final), "lora_r": 0})
    generator, tokenizer, *_ = load_models(cfg, torch.device("cpu"), None)
    assert not lora.is_peft(generator) and not any("lora_" in n for n, _ in generator.named_parameters())
    assert all(p.requires_grad for p in generator.parameters())
    torch.testing.assert_close(logits(generator, tokenizer), logits(lora_run.generator, lora_run.tokenizer),
                               rtol=1e-5, atol=1e-5)
