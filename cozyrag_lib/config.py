"""One config for every stage: a dataclass, preset files, and `--key=value` overrides.

Three doors lead to the same fields:
  * presets: small TOML files in `cozyrag_lib/presets/` (`tiny`, `demo`, `quality`, `original`, `hpc`),
  * the command line: `python -m cozyrag_lib chunk --preset=tiny --chunk_max_tokens=96`,
  * papermill: `papermill 02_chunk_corpus.ipynb out.ipynb -p preset tiny -p chunk_max_tokens 96`.
Unknown keys and values of the wrong type are errors, never silently ignored.

Example:
    >>> cfg = load_config("tiny", top_k=8)
    >>> cfg.top_k
    8
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import string
import time
import tomllib
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import CozyError, faiss_reason, first_line
from .jsonio import read_json
from .paths import RunPaths

PRESET_DIR = Path(__file__).parent / "presets"
PROMPT_FIELDS = ("question", "context")  # the placeholders retrieval.format_prompt fills in a prompt_template


@dataclass
class Config:
    # --- run -------------------------------------------------------------------------------
    run_name: str = "demo"  # artefacts go to {out_root}/{run_name}/
    out_root: str = "outputs/runs"  # parent folder of every run
    seed: int = 1337  # seeds model init, data order and sampling (splits use a fixed hash rule, no seed)
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda"
    debug: bool = False  # full tracebacks instead of one-line errors: `--debug` (=true, =1) on any command
    preset: str = ""  # the preset this config was built from (recorded by load_config, saved with each stage)

    # --- models ----------------------------------------------------------------------------
    generator: str = "embedded:smollm2-135m-instruct"  # embedded:..., tiny:gpt2, a folder, a .gguf, or a hub name
    retriever: str = "embedded:all-minilm-l6-v2"  # embedded:..., a sentence-transformers folder, or a hub name
    trust_remote_code: bool = False  # never run model code from a repo unless asked
    model_cache: str = "data/models"  # converted GGUF and tiny models are cached here

    # --- stage 1: QA -----------------------------------------------------------------------
    qa_sources: list[str] = field(default_factory=lambda: ["builtin"])  # "builtin" and/or QA files
    qa_format: str = "auto"  # auto, squad, qabot, tsv, jsonl (tables: .parquet/.arrow/.csv files, hf:NAME[:CONFIG][:SPLIT])
    qa_columns: list[str] = field(default_factory=list)  # table columns as field=column: question=query,answers=gold
    max_qa: int = 0  # keep at most this many QA pairs per source (0 = all)

    # --- stage 2: chunking -----------------------------------------------------------------
    corpus_sources: list[str] = field(default_factory=lambda: ["embedded"])  # "embedded", wikiextractor dirs, .jsonl, SQuAD .json, tables
    corpus_columns: list[str] = field(default_factory=list)  # table columns as field=column: title=name,text=body
    max_articles: int = 0  # read at most this many articles per source (0 = all)
    chunk_max_tokens: int = 128  # passage length limit in retriever tokens
    chunk_overlap_sentences: int = 1  # sentences repeated at the start of the next passage
    min_passage_chars: int = 30  # shorter passages are dropped
    embedded_descriptions: bool = True  # lead each embedded article (passages, built-in QA contexts) with its short description line

    # --- stage 3: index --------------------------------------------------------------------
    index_factory: str = "Flat"  # Flat, HNSW32, IVF{n},Flat, IVF{n},PQ{m}
    nprobe: int = 16  # IVF cells visited per query
    ef_search: int = 64  # HNSW search depth
    embed_batch_size: int = 64  # passages per retriever forward pass
    sentence_vectors: bool = True  # store every passage's sentence embeddings with the index (stage 3, final/): answers skip encoding context sentences; S x d x 2 bytes
    bm25_stemmer: str = "english"  # Snowball stemmer of the BM25 index built beside FAISS (PyStemmer), or "none"
    retrieval: str = "dense"  # how questions are retrieved everywhere: dense (FAISS), bm25, or hybrid (both, fused)
    rrf_k: int = 60  # hybrid: reciprocal-rank fusion constant, score = sum of 1 / (rrf_k + rank)

    # --- stage 4: training -----------------------------------------------------------------
    qa_extra: list[str] = field(default_factory=list)  # extra QA files added to the training split
    phases: list[str] = field(default_factory=lambda: ["generator", "retriever", "generator"])  # alternating schedule
    phase_repeats: int = 1  # run the phases list this many times (the original: 30 x [generator, retriever])
    epochs_per_phase: float = 1.0  # passes over the training QA per phase (fractions allowed)
    max_steps_per_phase: int = 0  # cap on optimizer steps per phase (0 = no cap)
    retriever_max_steps_per_phase: int = 0  # cap for retriever phases alone (0 = max_steps_per_phase)
    max_train_qa: int = 0  # use at most this many training QA pairs (0 = all)
    max_train_descriptions: int = 0  # keep at most this many built-in description questions in training (0 = all)
    drop_unsupported_years: bool = True  # description targets lose a trailing "(1879–1955)" whose years their context lacks (no invented dates)
    batch_size: int = 4  # per-process batch size
    grad_accum: int = 1  # micro-batches per optimizer step
    lr_generator: float = 5e-5  # AdamW learning rate of the generator
    lr_retriever: float = 5e-5  # AdamW learning rate of the retriever
    warmup_steps: int = 10  # linear warmup, then cosine decay to 10%
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the global gradient norm before each optimizer step (0 = off)
    lora_r: int = 0  # 0 = full fine-tuning of the generator; > 0 = LoRA adapters of this rank (peft), base weights frozen
    lora_alpha: int = 16  # LoRA scaling: the adapters' update is multiplied by lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the LoRA adapters' input
    lora_targets: list[str] = field(default_factory=list)  # modules LoRA adapts (q_proj,v_proj); empty = peft's default for the architecture
    lora_merge: bool = False  # with lora_r > 0: final/generator holds the merged full model instead of the adapter
    precision: str = "fp32"  # fp32, bf16 (autocast; faster on recent GPUs and CPUs with AMX), or auto (bf16 where fast)
    bf16_weights: bool = True  # under bf16: the generator holds bf16 weights, AdamW fp32 copies (master.py); false: fp32 weights under autocast
    train_attention: str = "auto"  # the generator's attention in training: sdpa (fused), eager (plain matmuls), or auto: eager on CPUs, where the fused backward measured slower (README, Speed), sdpa on GPUs
    compile_generator: bool = False  # torch.compile the generator's training forward (dynamic shapes); ~3 min to compile on 2 CPU cores, no reliable gain there (README, Speed)
    top_k: int = 4  # passages retrieved per question
    max_length: int = 256  # hard limit on prompt + answer tokens
    train_max_sentences: int = 10  # context sentences kept in training
    answer_max_sentences: int = 8  # context sentences kept when answering
    context_tokens: int = 128  # context token budget
    context_order: str = "relevance"  # the kept sentences best first, or "passage": in retrieval then reading order
    prompt_template: str = "Q: {question}\nContext:\n{context}\nA: "  # "chat" uses the tokenizer's chat template
    ngram_repeat_n: int = 3  # n of the n-gram repeat penalty
    ngram_repeat_weight: float = 0.1  # weight of the n-gram repeat penalty
    keyword_overlap_weight: float = 4.0  # weight of the keyword overlap penalty
    short_answer_min_words: int = 4  # answers shorter than this are penalised
    short_answer_weight: float = 5.0  # weight of the short answer penalty
    retriever_loss: str = "lm_supervised"  # lm_supervised or contrastive
    retriever_candidates: int = 8  # passages scored per question by the lm_supervised loss
    retriever_temperature: float = 0.1  # tau of the retriever score softmax
    target_temperature: float = 1.0  # temperature of the generator-likelihood target
    query_only: bool = False  # freeze the passage encoder (no index refresh)
    refresh: str = "full"  # after a retriever phase: full (re-embed every passage), retrieved (train_eval.py), none
    refresh_top_n: int = 20  # refresh=retrieved: each question's top passages (new queries, stale index) re-embedded
    eval_every: int = 50  # optimizer steps between evaluations
    checkpoint_every: int = 100  # optimizer steps between checkpoints
    max_val_qa: int = 200  # validation questions used for val_loss and val_recall@5
    val_questions: list[str] = field(default_factory=lambda: [
        "What is anarchism?", "Who was Albert Einstein?", "What are black holes?",
        "Define quantum mechanics.", "What is the capital of France?",
        "Explain the theory of evolution.", "What is machine learning?",
        "Who wrote 'Pride and Prejudice'?", "What is the speed of light?",
        "Describe the function of mitochondria.",
    ])  # answered and logged after each generator phase
    mlflow: bool = False  # log params, metrics and the final artefacts to MLflow (pip install mlflow)
    mlflow_uri: str = "sqlite:///outputs/mlflow/mlflow.db"  # tracking URI: a database file (artefacts beside it) or a server
    mlflow_experiment: str = "cozyrag"  # MLflow experiment the runs are logged under
    mlflow_log_models: bool = False  # also log final/generator and final/retriever as artefacts (large)

    # --- answering -------------------------------------------------------------------------
    max_new_tokens: int = 48  # answer length limit
    answer_quantization: str = "auto"  # int8: int8 weights when answering on a CPU (quantize.py); none; auto: int8 on CPUs fast at bf16
    prompt_lookup: int = 3  # greedy answers to one question: draft up to N tokens copied from the prompt, checked in one pass (0 = off)
    do_sample: bool = False  # greedy by default (reproducible)
    temperature: float = 0.6  # sampling temperature
    sample_top_k: int = 70  # sampling top-k
    top_p: float = 0.95  # sampling nucleus
    eval_batch_size: int = 64  # questions answered together by `evaluate` and notebook 05 (64: 1.97x batch 8 on 2 cores, README Speed)
    max_eval_qa: int = 200  # test questions evaluated per table row in notebook 05 (0 = all)

    # ------------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.out_root) / self.run_name

    @property
    def paths(self) -> RunPaths:
        """Every artefact path of this run (`cozyrag_lib.paths`)."""
        return RunPaths(self.run_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as JSON (atomically)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


FIELDS = {f.name: f for f in fields(Config)}


def _field_type(name: str) -> Any:
    t = FIELDS[name].type
    return eval(t, {"list": list, "str": str, "int": int, "float": float, "bool": bool}) if isinstance(t, str) else t


def coerce(name: str, value: Any, source: str = "override") -> Any:
    """Check (and for strings from the command line, parse) one value for field `name`.

    >>> coerce("top_k", "8")
    8
    >>> coerce("phases", "generator,retriever")
    ['generator', 'retriever']
    """
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CozyError(f"{source}: unknown config key '{name}'{hint}")
    t = _field_type(name)
    bad = CozyError(f"{source}: {name}={value!r} is not a valid {getattr(t, '__name__', str(t))}")
    if isinstance(t, types.GenericAlias):  # list[str]: a JSON list, or comma-separated text
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad from None
        elif isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad
        return list(value)
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if t is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if t is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if not isinstance(value, str):
        raise bad
    return value


def validate(cfg: Config) -> Config:
    """Reject values that parse but make no sense."""
    positive = ["top_k", "batch_size", "eval_batch_size", "grad_accum", "max_length", "chunk_max_tokens", "embed_batch_size",
                "context_tokens", "train_max_sentences", "answer_max_sentences", "ngram_repeat_n",
                "retriever_candidates", "nprobe", "ef_search", "max_new_tokens", "eval_every",
                "checkpoint_every", "min_passage_chars", "phase_repeats", "rrf_k"]
    for k in positive:
        if getattr(cfg, k) <= 0:
            raise CozyError(f"config: {k} must be positive, got {getattr(cfg, k)}")
    non_negative = ["lr_generator", "lr_retriever", "warmup_steps", "weight_decay", "max_qa", "max_articles",
                    "chunk_overlap_sentences", "max_steps_per_phase", "max_train_qa", "epochs_per_phase", "max_eval_qa",
                    "prompt_lookup",
                    "ngram_repeat_weight", "keyword_overlap_weight", "short_answer_weight", "short_answer_min_words",
                    "grad_clip", "max_val_qa", "max_train_descriptions",
                    "retriever_max_steps_per_phase"]
    for k in non_negative:
        if getattr(cfg, k) < 0:
            raise CozyError(f"config: {k} must not be negative, got {getattr(cfg, k)}")
    for k in ["retriever_temperature", "target_temperature", "temperature"]:
        if getattr(cfg, k) <= 0:
            raise CozyError(f"config: {k} must be positive, got {getattr(cfg, k)}")
    if cfg.lora_r < 0:
        raise CozyError(f"config: lora_r must not be negative (0 = full fine-tuning), got {cfg.lora_r}")
    if cfg.lora_alpha <= 0:
        raise CozyError(f"config: lora_alpha must be positive, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise CozyError(f"config: lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not 0 < cfg.top_p <= 1:
        raise CozyError(f"config: top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.sample_top_k < 0:
        raise CozyError(f"config: sample_top_k must not be negative (0 = no top-k cut), got {cfg.sample_top_k}")
    check_prompt_template(cfg.prompt_template)
    check_index_factory(cfg.index_factory)
    if cfg.retriever_loss not in ("lm_supervised", "contrastive"):
        raise CozyError(f"config: retriever_loss must be lm_supervised or contrastive, got {cfg.retriever_loss!r}")
    if cfg.context_order not in ("relevance", "passage"):
        raise CozyError(f"config: context_order must be relevance or passage, got {cfg.context_order!r}")
    if cfg.retrieval not in ("dense", "bm25", "hybrid"):
        raise CozyError(f"config: retrieval must be dense, bm25 or hybrid, got {cfg.retrieval!r}")
    if cfg.refresh not in ("full", "retrieved", "none"):
        raise CozyError(f"config: refresh must be full, retrieved or none, got {cfg.refresh!r}")
    if cfg.refresh_top_n <= 0:
        raise CozyError(f"config: refresh_top_n must be positive, got {cfg.refresh_top_n}")
    if not cfg.bm25_stemmer.strip():
        raise CozyError("config: bm25_stemmer must name a Snowball stemmer (english, porter, ...) or be none")
    if cfg.precision not in ("fp32", "bf16", "auto"):
        raise CozyError(f"config: precision must be fp32, bf16 or auto, got {cfg.precision!r}")
    if cfg.train_attention not in ("auto", "sdpa", "eager"):
        raise CozyError(f"config: train_attention must be auto, sdpa or eager, got {cfg.train_attention!r}")
    if cfg.answer_quantization not in ("auto", "int8", "none"):
        raise CozyError(f"config: answer_quantization must be auto, int8 or none, got {cfg.answer_quantization!r}")
    if cfg.qa_format not in ("auto", "squad", "qabot", "tsv", "jsonl"):
        raise CozyError(f"config: qa_format must be auto, squad, qabot, tsv or jsonl, got {cfg.qa_format!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise CozyError(f"config: device must be auto, cpu or cuda, got {cfg.device!r}")
    if not cfg.phases:
        raise CozyError("config: phases is empty; name at least one of generator, retriever")
    for p in cfg.phases:
        if p not in ("generator", "retriever"):
            raise CozyError(f"config: phases may hold only 'generator' and 'retriever', got {p!r}")
    if not cfg.run_name or "/" in cfg.run_name or cfg.run_name in (".", ".."):
        raise CozyError(f"config: run_name must be a plain folder name, got {cfg.run_name!r}")
    return cfg


def check_prompt_template(template: str) -> None:
    """A prompt_template holds no placeholders but {question} and {context} (or is "chat"); else a CozyError.

    >>> check_prompt_template("Question: {question}\\nAnswer: ")
    """
    if template == "chat":
        return
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # a lone "{" or "}"
        raise CozyError(f"config: prompt_template={template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    for name in names:
        if name not in PROMPT_FIELDS:
            known = ", ".join("{" + f + "}" for f in PROMPT_FIELDS)
            raise CozyError(f"config: prompt_template has an unknown placeholder {{{name}}} (known: {known})")


def index_factory_error(factory: str, e: Exception) -> CozyError:
    """The one-line error for an index_factory string that FAISS refused with the C++ error `e`."""
    return CozyError(f"config: index_factory={factory!r}: faiss cannot build it ({faiss_reason(e)}); "
                     "try Flat, HNSW32, IVF{n},Flat or IVF{n},PQ{m}")


def check_index_factory(factory: str) -> None:
    """An index_factory string FAISS cannot parse is an error before any file is read.

    FAISS builds an empty index for a small dimension (cheap). Only a parse failure counts here: whether the
    string fits the retriever's dimension and the number of passages is for the index stage to say.
    """
    if factory == "Flat":  # the default: no need to import faiss
        return
    import faiss  # 0.1 s, and only for a factory other than the default

    try:
        faiss.index_factory(64, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        if "could not parse" in str(e):
            raise index_factory_error(factory, e) from None


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def read_preset(preset: str) -> dict[str, Any]:
    """Values from a preset name (`tiny`) or a TOML file path."""
    path = Path(preset) if preset.endswith(".toml") else PRESET_DIR / f"{preset}.toml"
    if not path.is_file():
        raise CozyError(f"preset '{preset}' not found (known presets: {', '.join(list_presets())}; or give a .toml path)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CozyError(f"{path}: not valid TOML ({e})") from None


def load_config(preset: str | None = "demo", overrides: dict[str, Any] | None = None, **kw: Any) -> Config:
    """Defaults <- preset file <- overrides; every key and type checked."""
    values: dict[str, Any] = {}
    if preset:
        src = f"preset {preset}"
        for k, v in read_preset(preset).items():
            values[k] = coerce(k, v, src)
        values.setdefault("preset", preset)  # a resolved config written as a preset (launch.toml) keeps its own
    for k, v in {**(overrides or {}), **kw}.items():
        values[k] = coerce(k, v)
    return validate(Config(**values))


def parse_cli_overrides(args: list[str]) -> tuple[str | None, dict[str, str]]:
    """Split `--preset=tiny --top_k=8` (or `--top_k 8`) into ("tiny", {"top_k": "8"}); other shapes are errors.

    The command-line grammar of `cozyrag_lib.cli` for a command line without command options.
    """
    from .cli import parse_overrides

    return parse_overrides("command line", args)


_NOTEBOOK_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "preset"}


def notebook_config(namespace: dict[str, Any], extra: tuple[str, ...] = ()) -> Config:
    """Build the config from a notebook's parameters (papermill injects them as globals).

    Every public global that is a plain value must be a config field (or `preset`); values left as
    None fall back to the preset. A misspelt papermill parameter is therefore an error, not a no-op.
    Names in `extra` are notebook parameters that are not config keys (e.g. a default question).
    The parameter names are remembered on the first call, so re-running the cell later in Jupyter
    (when `cfg` and other results exist) checks the same names again.
    The preset is, in order: the notebook's `preset` parameter (what papermill injects), the
    COZYRAG_PRESET environment variable (how the test command runs the notebooks under nbval on the tiny
    preset), the most recent run under `out_root` (a notebook opened by hand continues the run the user
    made: that run's saved settings, with the notebook's parameters on top), else "demo". It prints
    which, and why.
    A kernel started in `notebooks/` (Jupyter's habit) moves to the project root, so relative paths
    such as `outputs/runs` mean the same as under run_all.sh.
    """
    if "_cozyrag_parameters" not in namespace:
        namespace["_cozyrag_parameters"] = [
            k for k, v in namespace.items()
            if not (k.startswith("_") or k in _NOTEBOOK_NAMES or k in extra or callable(v) or isinstance(v, types.ModuleType))]
        here = Path.cwd()
        if here.name == "notebooks" and (here.parent / "pyproject.toml").is_file() and (here.parent / "cozyrag_lib").is_dir():
            os.chdir(here.parent)
    overrides = {}
    for k in namespace["_cozyrag_parameters"]:
        if k not in FIELDS:
            raise CozyError(f"notebook parameter '{k}' is not a config key")
        if namespace[k] is not None:
            overrides[k] = namespace[k]
    if namespace.get("preset"):
        preset, why = namespace["preset"], "the notebook's preset parameter"
    elif os.environ.get("COZYRAG_PRESET"):
        preset, why = os.environ["COZYRAG_PRESET"], "from $COZYRAG_PRESET"
    else:
        out_root = overrides.get("out_root") or Config.out_root
        latest = latest_run(out_root)
        if latest is not None:
            path, values = latest
            cfg = load_config(None, {**values, **overrides})
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
            print(f"preset {cfg.preset or '(not recorded)'}: the settings of the most recent run, {path.parent.parent} "
                  f"({path.parent.name}/{path.name}, {when}); no preset parameter or $COZYRAG_PRESET says otherwise")
            return cfg
        preset, why = "demo", f"the default: no preset parameter, no $COZYRAG_PRESET, no run under {out_root}/ yet"
    print(f"preset {preset} ({why})")
    return load_config(preset, overrides)


def latest_run(out_root: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The most recent run under `out_root`: (its newest stage config.json, the values saved there), or None.

    "Most recent" is the run whose last stage wrote its config last. A config that no longer loads (an
    edited file, one from another version) is skipped with a note.
    """
    found = sorted(((p.stat().st_mtime, p) for run in (Path(out_root).iterdir() if Path(out_root).is_dir() else ())
                    if run.is_dir() for p in RunPaths(run).stage_configs() if p.is_file()), reverse=True)
    for _, path in found:
        try:
            values = read_json(path)
            if not isinstance(values, dict):
                raise ValueError("not a JSON object")
            values.update(out_root=str(path.parent.parent.parent), run_name=path.parent.parent.name)
            load_config(None, values)
            return path, values
        except (OSError, ValueError, CozyError) as e:
            print(f"note: {path}: skipped, not a config this version reads ({first_line(e)})")
    return None
