"""LoRA: train low-rank adapters on the generator instead of all its weights (peft), so 1-8B generators fit.

With `lora_r > 0` the run wraps the generator in `peft.get_peft_model` (`add_lora`): the base weights are
frozen, only the adapters (rank `lora_r`, scale `lora_alpha / lora_r`, on the modules `lora_targets`) get
gradients and AdamW state. What is saved:

    train/checkpoints/last/generator/   the adapter (adapter_config.json, adapter_model.safetensors) + tokenizer
    final/generator/                    the same; with lora_merge the merged full model (a plain HF folder)

`models.load_generator` loads an adapter folder on top of its base (the run config's `generator` spec).
peft is imported inside the functions: it adds seconds to an import and only LoRA runs need it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from . import distributed
from .config import Config
from .errors import CozyError
from .models import is_peft, load_generator

# module names of the attention projections, tried in order when peft knows no default for an architecture
TARGET_GUESSES = (("q_proj", "v_proj"), ("c_attn",), ("query_key_value",), ("qkv_proj",), ("Wqkv",), ("query", "value"))


def lora_targets(model, targets: list[str] | None = None) -> list[str]:
    """The modules LoRA adapts: `targets`, else peft's default for the architecture, else a guess by name.

    >>> lora_targets(gpt2)                   # doctest: +SKIP
    ['c_attn']
    """
    if targets:
        return list(targets)
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(model.config, "model_type", "")
    if model_type in DEFAULTS:
        return list(DEFAULTS[model_type])
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for guess in TARGET_GUESSES:
        if set(guess) <= names:
            return list(guess)
    raise CozyError(f"generator {model_type or type(model).__name__}: peft has no default LoRA targets for it; "
                    "name its attention projections with lora_targets=... (e.g. lora_targets=q_proj,v_proj)")


def add_lora(model, cfg: Config):
    """`model` (a causal LM) with fresh LoRA adapters per cfg: a peft model whose only trainable weights are them.

    The adapters' A matrices are drawn from torch's random stream (B starts at zero, so the model's output is
    unchanged at step 0). The adapter config records the base as a path that loads from anywhere on this
    machine (an absolute folder, or the hub name).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise CozyError(f"lora_r={cfg.lora_r} needs peft: pip install peft (or pip install -e '.[lora]')") from None
    from transformers.pytorch_utils import Conv1D

    targets = lora_targets(model, cfg.lora_targets)
    # GPT-2's Conv1D stores its weight transposed (in, out): peft must know, or the merged weights come out wrong
    conv1d = any(isinstance(m, Conv1D) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                        fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # "Target modules {...} not found in the base model"
        raise CozyError(f"lora_targets={','.join(targets)}: {str(e).splitlines()[0]}") from None
    base = peft_model.peft_config["default"].base_model_name_or_path or ""
    if base and Path(base).exists():
        peft_model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    return peft_model


def with_lora(generator, cfg: Config):
    """The generator to train: LoRA-wrapped with lora_r > 0 (unless it already carries adapters: a resumed run),
    else as it is. Prints what trains (rank 0)."""
    if cfg.lora_r and not is_peft(generator):
        generator = add_lora(generator, cfg)
    if is_peft(generator) and distributed.is_main_process():
        trainable, total = generator.get_nb_trainable_parameters()
        lc = generator.peft_config["default"]
        print(f"LoRA r={lc.r} alpha={lc.lora_alpha} on {','.join(sorted(lc.target_modules))}: {trainable:,} trainable "
              f"parameters of {total:,} ({100 * trainable / total:.2f}%)", flush=True)
    return generator


def save_generator(generator, tokenizer, folder: Path, cfg: Config, merge: bool = False) -> None:
    """A generator folder: the whole model, or a peft model's adapter; with `merge`, the adapter merged into a
    copy of the base (a plain transformers folder). The tokenizer goes beside it.

    The merged copy is built on the CPU from the saved adapter and a fresh load of the base (cfg.generator), so
    the model in training keeps its adapters and the GPU holds no second copy: it needs the base's size in RAM.
    """
    if merge and is_peft(generator):
        with tempfile.TemporaryDirectory() as tmp:
            generator.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            merged, _ = load_generator(tmp, cfg.model_cache, cfg.trust_remote_code, base=cfg.generator)
            merged.merge_and_unload().save_pretrained(folder, safe_serialization=True)
    else:
        generator.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
