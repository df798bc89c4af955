"""One grammar for every command: `python -m cozyrag_lib CMD [--preset=NAME] [--key=value ...] [options]`.

    python -m cozyrag_lib chunk --preset=tiny --chunk_max_tokens=96
    python -m cozyrag_lib train --preset=demo --batch_size=8 --resume
    python -m cozyrag_lib ask --run=demo --top_k=2 --device=cpu "Who was Albert Einstein?"
    python -m cozyrag_lib evaluate --run base:demo --qa outputs/runs/demo/qa/test.jsonl --mode=closed

* `--KEY=VALUE` (or `--KEY VALUE`) sets a config key, spelt as in `cozyrag_lib.config.Config`; a bool key
  alone (`--do_sample`) means true, other values only with `=` (`--do_sample=false`).
* A command's own options (`--run`, `--qa`, `--resume`, ...) are declared in COMMANDS below, the one table;
  they take the same two forms, flags the bool form. A command option wins over a config key of the same
  name (`bench train --generator=SPEC`).
* `--preset=NAME` (or a .toml path) picks the preset, `demo` unless given.
* `--debug` (`--debug=true`, `--debug=1`; `--debug=false` turns it off) is the config key `debug`:
  tracebacks instead of one-line errors, on every command.
* `--help` prints the command's options; `--` ends the options (later arguments are positional).

Anything else (a misspelt key, an old spelling such as `--top-k`, a stray word) is one line, exit status 2:
`error: ask: unknown option --top-k (did you mean --top_k?)`.

    >>> p = parse_command("train", ["--preset=tiny", "--top_k", "8", "--resume"])
    >>> p.preset, p.overrides, p.options
    ('tiny', {'top_k': '8'}, {'resume': True})
"""
from __future__ import annotations

import difflib
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .config import FIELDS, _field_type, coerce, load_config
from .errors import CozyError

REQUIRED = object()  # the default of an option that must be given
POSITIONAL = list  # the type of the entry that collects a command's bare arguments (one or more)
RUN_HELP = "run folder or name; base:RUN for its untrained base models (default: the preset's run, out_root/run_name)"
BENCH_THREADS = {"threads": (int, 0, "torch and FAISS threads (0 = their default)")}

# command -> (what it does, {option: (type, default, help)}); type: str, int, float, bool (a flag), a tuple of
# the allowed values, or POSITIONAL. Config keys are not listed here: every command takes them all.
COMMANDS: dict[str, tuple[str, dict[str, tuple[Any, Any, str]]]] = {
    "prepare-qa": ("Stage 1: read the QA sources, write the train/validation/test splits.", {}),
    "chunk": ("Stage 2: split the corpus into passages.", {}),
    "index": ("Stage 3: embed the passages, build the FAISS index.", {}),
    "train": ("Stage 4: fine-tune generator and retriever in alternating phases (also python -m cozyrag_lib.train).", {
        "resume": (bool, False, "continue from the run's last checkpoint (after a crash or kill)"),
    }),
    "ask": ("Answer questions with a run; config keys override the run's saved config (e.g. --top_k=2).", {
        "question": (POSITIONAL, REQUIRED, "one or more questions (quote each)"),
        "run": (str, None, RUN_HELP),
        "mode": (("rag", "closed"), "rag", "rag retrieves passages, closed answers without context"),
        "json": (bool, False, "print one JSON object per question instead of text"),
    }),
    "evaluate": ("Evaluate a run on a QA file (EM/F1, recall@k, latency); config keys override the run's saved "
                 "config (e.g. --top_k=8; --retrieval=bm25 or hybrid; --eval_batch_size=16 questions answered together).", {
                     "run": (str, None, RUN_HELP),
                     "qa": (str, REQUIRED, "QA file or table in any format prepare-qa reads (e.g. RUN/qa/test.jsonl, "
                                         "test.parquet, hf:rajpurkar/squad::validation)"),
                     "format": (str, "auto", "QA file format: auto, squad, qabot, tsv or jsonl (or the config key --qa_format)"),
                     "corpus": (str, None, "passages JSONL to search instead of the run's index"),
                     "mode": (("rag", "closed", "oracle"), "rag", "rag retrieves; closed: no context; oracle: the "
                              "item's gold context"),
                     "limit": (int, 0, "evaluate only the first N questions (0 = all)"),
                     "out": (str, None, "summary JSON path (default RUN/eval/<mode>[-<retrieval>]-<qa name>.json)"),
                 }),
    "bench": ("Benchmarks, one JSON line each: bench index|train|ask|scale|refresh (see `bench --help`).", {
        "benchmark": (POSITIONAL, REQUIRED, "index, train, ask, scale or refresh, then its options"),
    }),
    "bench index": ("Passages/s of our embedding against raw encode; FAISS build time and recall@10 per index type.", {
        "max_passages": (int, 0, "embed at most this many of the run's passages (0 = all)"), **BENCH_THREADS,
    }),
    "bench train": ("Samples/s, tokens/s and MFU of our generator phase against the per-sample loop it replaced.", {
        "steps": (int, 20, "timed steps"),
        "warmup": (int, 1, "untimed steps first"),
        "style": (str, "both", "both (ours and the per-sample loop, step by step) or ours"),
        "generator": (str, "bench:distilgpt2", "generator spec to measure (not the config key)"),
        "fused_adamw": (int, 1, "0: ours with the per-tensor AdamW instead of training's fused one"),
        "reference": (int, 1, "1: where ours differs from it, also time the path before (fp32 weights, under "
                              "autocast with bf16; sdpa attention; not compiled), step by step"),
        **BENCH_THREADS,
    }),
    "bench ask": ("p50 / p95 latency of one-question answer() calls, split into retrieve / context / generate.", {
        "questions": (int, 50, "timed questions"),
        "warmup": (int, 2, "untimed questions first"),
        "reference": (str, "none", "answer_quantization of a second pipeline timed in turn with the run's "
                      "(auto, int8 or none; empty: no reference)"),
        "reference_prompt_lookup": (int, 0, "prompt_lookup of the reference pipeline (0: token by token)"),
        **BENCH_THREADS,
    }),
    "bench scale": ("An IVF-PQ index over --n vectors: build time, memory, recall@10, ms per query.", {
        "n": (int, 1_000_000, "vectors in the index"),
        "queries": (int, 200, "queries searched"),
        "factory": (str, "", "FAISS factory string (default IVF{~sqrt(n)},PQ48,Refine(Flat))"),
        "train": (int, 65536, "training points"),
        "nprobes": (str, "4,8,16,32,64", "nprobe values measured"),
        "k_factors": (str, "2,4,8", "re-ranking factors measured"),
        "noise": (float, 1.0, "Gaussian noise added to the tiled embeddings"),
        "k": (int, 10, "neighbours per query"),
        **BENCH_THREADS,
    }),
    "bench refresh": ("Index refresh strategies (stale, full, retrieved, rerank) on a trained run: recall, seconds, "
                      "passages embedded; with --n their costs at n passages (embedding extrapolated).", {
        "top_n": (int, 0, "retrieved: top passages per question re-embedded (0 = the config's refresh_top_n)"),
        "rerank_n": (int, 100, "rerank: stale candidates per question re-embedded and re-scored"),
        "n": (int, 0, "passages of the synthetic corpus timed at scale (0 = the strategies on the run)"),
        "sample": (int, 2000, "with --n: corpus-like texts embedded to measure passages/s"),
        "questions": (int, 10000, "with --n: training questions whose top_n passages are united"),
        "noise": (float, 1.0, "with --n: Gaussian noise added to the tiled stage-3 embeddings"),
        **BENCH_THREADS,
    }),
}

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass
class Parsed:
    """A parsed command line: the preset, the config overrides (strings, each checked) and the command's options
    (typed, defaults filled in; `given` names the ones on the command line)."""

    command: str
    preset: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    given: set[str] = field(default_factory=set)

    def config(self):
        """The Config: the preset (demo unless given) with the overrides."""
        return load_config(self.preset or "demo", self.overrides)

    def as_argv(self, skip: Sequence[str] = ()) -> list[str]:
        """The same command line in the canonical `--key=value` form (given options only, positionals last).

        >>> parse_command("bench scale", ["--n", "10", "--top_k=2", "--threads=1"]).as_argv(skip=["threads"])
        ['--top_k=2', '--n=10']
        """
        spec = COMMANDS[self.command][1]
        out = [f"--preset={self.preset}"] if self.preset else []
        out += [f"--{k}={v}" for k, v in self.overrides.items()]
        positional: list[str] = []
        for k in spec:  # the table's order
            if k not in self.given or k in skip:
                continue
            kind, value = spec[k][0], self.options[k]
            if kind is POSITIONAL:
                positional = ["--", *value]
            elif kind is bool:
                out += [f"--{k}"] if value else []
            else:
                out.append(f"--{k}={value}")
        return out + positional


def parse_command(command: str, argv: Sequence[str]) -> Parsed:
    """Parse `argv` (what follows the command name) by the command's entry in COMMANDS; `--help` prints its
    help and exits with status 0; anything unknown is a CozyError naming the closest spelling."""
    if command not in COMMANDS:
        raise CozyError(f"unknown command '{command}' (commands: {', '.join(c for c in COMMANDS if ' ' not in c)})")
    return _parse(command, COMMANDS[command][1], argv)


def parse_overrides(label: str, argv: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """(preset, overrides) of a command line that holds only `--preset` and config keys; `label` starts errors."""
    parsed = _parse(label, {}, argv)
    return parsed.preset, parsed.overrides


def _parse(label: str, spec: dict[str, tuple[Any, Any, str]], argv: Sequence[str]) -> Parsed:
    parsed = Parsed(label)
    positional = next((k for k, (kind, _, _) in spec.items() if kind is POSITIONAL), None)
    bare: list[str] = []
    args, i, options_done = list(argv), 0, False
    while i < len(args):
        a = args[i]
        i += 1
        if options_done or not a.startswith("--") or a == "--":
            if a == "--" and not options_done:
                options_done = True
            elif a == "-h" and not options_done and label in COMMANDS:
                _print_help(label)
            elif positional:
                bare.append(a)
            else:
                raise CozyError(f"{label}: argument {a!r}: expected --key=value")
            continue
        name, eq, value = a[2:].partition("=")
        if name == "help" and label in COMMANDS:
            _print_help(label)
        if name in spec and spec[name][0] is not POSITIONAL:  # the command's own option (wins over a config key)
            kind = spec[name][0]
        elif name in FIELDS or name == "preset":
            kind = str if name == "preset" else _field_type(name)
        else:
            raise CozyError(f"{label}: unknown option --{name}{_did_you_mean(name, spec)}")
        if not eq and kind is bool:
            value = "true"
        elif not eq:
            if i >= len(args) or args[i].startswith("--"):
                raise CozyError(f"{label}: --{name} needs a value (--{name}=VALUE)")
            value, i = args[i], i + 1
        if name in spec:
            parsed.options[name] = _option_value(label, name, kind, value)
            parsed.given.add(name)
        elif name == "preset":
            parsed.preset = value
        else:
            coerce(name, value, label)
            parsed.overrides[name] = value
    for k, (kind, default, _) in spec.items():
        if kind is POSITIONAL and bare:
            parsed.options[k] = bare
            parsed.given.add(k)
        elif k not in parsed.options:
            if default is REQUIRED:
                what = f"{k.upper()}..." if kind is POSITIONAL else f"--{k}"
                raise CozyError(f"{label}: {what} is required ({spec[k][2]})")
            parsed.options[k] = default
    return parsed


def _option_value(label: str, name: str, kind: Any, value: str) -> Any:
    if kind is bool:
        if value.lower() not in _BOOL:
            raise CozyError(f"{label}: --{name}={value!r} is not true or false")
        return _BOOL[value.lower()]
    if isinstance(kind, tuple):
        if value not in kind:
            raise CozyError(f"{label}: --{name} must be one of {', '.join(kind)}, got {value!r}")
        return value
    try:
        return kind(value)
    except ValueError:
        raise CozyError(f"{label}: --{name}={value!r} is not {'an integer' if kind is int else 'a number'}") from None


def _did_you_mean(name: str, spec: dict) -> str:
    known = ["preset", *(k for k, v in spec.items() if v[0] is not POSITIONAL), *FIELDS]
    underscored = name.replace("-", "_")
    if underscored in known:  # an old spelling: --top-k for --top_k
        close = [underscored]
    else:  # the closest names, those about as close as the best
        scored = sorted(((difflib.SequenceMatcher(None, underscored, k).ratio(), k) for k in known), reverse=True)
        close = [k for r, k in scored[:3] if r >= max(0.6, scored[0][0] - 0.05)]
    return f" (did you mean {' or '.join('--' + c for c in close)}?)" if close else ""


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether the command line asks for tracebacks: the last `--debug[=BOOL]` before any `--` wins (a bad
    value changes nothing here; the parser reports it).

    >>> debug_requested(["chunk", "--debug=1"]), debug_requested(["--debug", "chunk", "--debug=false"])
    (True, False)
    """
    debug = False
    for a in argv:
        if a == "--":
            break
        if a == "--debug" or a.startswith("--debug="):
            debug = _BOOL.get(a.partition("=")[2].lower() if "=" in a else "true", debug)
    return debug


# ----------------------------------------------------------------------------------------------
# help


def _metavar(name: str, kind: Any) -> str:
    if kind is POSITIONAL:
        return f"{name.upper()}..."
    if kind is bool:
        return f"--{name}"
    if isinstance(kind, tuple):
        return f"--{name}={'|'.join(kind)}"
    value = {int: "N", float: "X"}.get(kind, name.upper())
    return f"--{name}={value}"


def help_text(command: str) -> str:
    """Usage, the command's options and the config keys every command takes."""
    summary, spec = COMMANDS[command]
    positional = [_metavar(k, v[0]) for k, v in spec.items() if v[0] is POSITIONAL]
    lines = [f"usage: python -m cozyrag_lib {command} [--preset=NAME] [--key=value ...]"
             f"{' [options]' if len(spec) > len(positional) else ''}{''.join(' ' + p for p in positional)}", "",
             summary, "", "options:" if spec else "options: none besides the config keys"]
    for k, (kind, default, text) in spec.items():
        shown = "" if default is None or default is REQUIRED or default == "" or kind is bool else f" (default: {default})"
        lines.append(f"  {_metavar(k, kind):<28} {text}{shown}{' (required)' if default is REQUIRED else ''}")
    lines += ["", "every command:",
              f"  {'--preset=NAME':<28} a preset in cozyrag_lib/presets/ or a .toml path (default: demo)",
              f"  {'--debug[=true|false]':<28} tracebacks instead of one-line errors",
              f"  {'--KEY=VALUE, --KEY VALUE':<28} a config key (cozyrag_lib/config.py says what each means); "
              "a bool key alone means true", "",
              "config keys:", textwrap.fill(", ".join(FIELDS), 100, initial_indent="  ", subsequent_indent="  ")]
    return "\n".join(lines) + "\n"


def _print_help(command: str) -> None:
    print(help_text(command), end="")
    raise SystemExit(0)


# ----------------------------------------------------------------------------------------------
# ask and evaluate: which run, with which overrides


def locate_run(parsed: Parsed) -> tuple[Path, bool, dict[str, Any]]:
    """(run folder, base?, keywords for `RAG.load`) of an ask/evaluate command line.

    `--run` names the run (out_root is where names are looked up), else the preset's run folder
    (out_root/run_name). Every override is checked here, before any model loads; the ones other than
    out_root and run_name become overrides of the run's saved config, `device` RAG.load's device.
    """
    from .rag import resolve_run

    cfg = parsed.config()
    if not parsed.options["run"] and not cfg.run_dir.is_dir():
        raise CozyError(f"{parsed.command}: no run folder {cfg.run_dir} (the preset's run; build it, or name one with --run)")
    run_dir, base = resolve_run(parsed.options["run"] or cfg.run_dir, cfg.out_root)
    load_kw: dict[str, Any] = {k: v for k, v in parsed.overrides.items() if k not in ("out_root", "run_name")}
    if "device" in load_kw:
        from .distributed import resolve_device  # imports torch: only when a device is asked for

        load_kw["device"] = resolve_device(cfg.device)
    return run_dir, base, load_kw


def run_spec(run_dir: Path, base: bool) -> str:
    """The RUN spec of a located run (`base:` prefixed for its base models)."""
    return f"{'base:' if base else ''}{run_dir}"

