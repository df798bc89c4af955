"""Command line: `python -m cozyrag_lib COMMAND [--preset=NAME] [--key=value ...] [options]`.

Config keys keep the names of `cozyrag_lib.config.Config` on every command; each command's own options
(`--run`, `--qa`, `--mode`, `--resume`, ...) are in the table in `cozyrag_lib/cli.py`, which parses them all:
    python -m cozyrag_lib prepare-qa --preset=tiny --qa_sources=builtin,../shared/data/squad/x.json
    python -m cozyrag_lib chunk --preset=demo --chunk_max_tokens=96
    python -m cozyrag_lib index --preset=demo --index_factory=HNSW32
    python -m cozyrag_lib train --preset=demo --resume          # also python -m cozyrag_lib.train, torchrun
    python -m cozyrag_lib ask --run=demo --top_k=2 "Who was Albert Einstein?"
    python -m cozyrag_lib evaluate --run=demo --qa=outputs/runs/demo/qa/test.jsonl --mode=closed
`python -m cozyrag_lib COMMAND --help` lists the command's options and the config keys.

Errors in the user's input print one line (`error: FILE:LINE: what is wrong`) and exit with status 2;
`--debug` (`--debug=true`, `--debug=1`) shows the traceback instead.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

from .cli import COMMANDS, debug_requested, parse_command
from .errors import CozyError, run_guarded

# command -> (module, function taking a Config and the command's options, returning a JSON-able summary)
STAGES = {
    "prepare-qa": ("cozyrag_lib.qa", "prepare_qa"),
    "chunk": ("cozyrag_lib.chunking", "chunk_corpus"),
    "index": ("cozyrag_lib.index", "build_index"),
    "train": ("cozyrag_lib.train", "train"),
}
# command -> module with a `cli(argv)` that parses argv with `cli.parse_command` and does more than one call
TOOLS = {
    "ask": "cozyrag_lib.rag",
    "evaluate": "cozyrag_lib.evaluate",
    "bench": "cozyrag_lib.bench",
}


def _usage() -> str:
    width = max(map(len, [*STAGES, *TOOLS]))
    return (__doc__ or "") + "\ncommands:\n" + "".join(
        f"  {c:<{width}}  {COMMANDS[c][0]}\n" for c in [*STAGES, *TOOLS])


def _module(command: str, name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise CozyError(f"command '{command}' is not available in this version") from None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    while argv and (argv[0] == "--debug" or argv[0].startswith("--debug=")):  # `--debug COMMAND ...`
        argv.pop(0)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]

    def run() -> None:
        if command in STAGES:
            parsed = parse_command(command, rest)
            cfg = parsed.config()
            module, name = STAGES[command]
            summary = getattr(_module(command, module), name)(cfg, **parsed.options)
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns it (the group may be gone)
                print(json.dumps(summary, indent=2, default=str))
        elif command in TOOLS:
            rc = _module(command, TOOLS[command]).cli(rest)
            if rc:
                raise SystemExit(rc)
        else:
            raise CozyError(f"unknown command '{command}' (commands: {', '.join([*STAGES, *TOOLS])})")

    return run_guarded(run, debug)


if __name__ == "__main__":
    sys.exit(main())
