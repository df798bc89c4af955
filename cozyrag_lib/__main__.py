"""Command line: `python -m cozyrag_lib COMMAND [--preset=NAME] [--key=value ...] [--debug]`.

Stage commands take config overrides with the names of `cozyrag_lib.config.Config`:
    python -m cozyrag_lib prepare-qa --preset=tiny --qa_sources=builtin,../shared/data/squad/x.json
    python -m cozyrag_lib chunk --preset=demo --chunk_max_tokens=96
    python -m cozyrag_lib index --preset=demo --index_factory=HNSW32
Training is its own script: `python -m cozyrag_lib.train --preset=tiny` or under torchrun.

Errors in the user's input print one line (`error: FILE:LINE: what is wrong`) and exit with status 2;
`--debug` shows the traceback instead.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

from .errors import CozyError, run_guarded

# command -> (module, function taking a Config and returning a JSON-able summary)
STAGES = {
    "prepare-qa": ("cozyrag_lib.qa", "prepare_qa"),
    "chunk": ("cozyrag_lib.chunking", "chunk_corpus"),
    "index": ("cozyrag_lib.index", "build_index"),
}
# command -> module with its own `cli(argv)` (argument shapes other than --key=value)
TOOLS = {
    "train": "cozyrag_lib.train",
    "ask": "cozyrag_lib.rag",
    "evaluate": "cozyrag_lib.evaluate",
    "bench": "cozyrag_lib.bench",
}


def _usage() -> str:
    return (__doc__ or "") + "\ncommands: " + ", ".join([*STAGES, *TOOLS]) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]

    def run() -> None:
        if command in STAGES:
            from .config import load_config, parse_cli_overrides

            preset, overrides = parse_cli_overrides(rest)
            cfg = load_config(preset or "demo", overrides)
            module, name = STAGES[command]
            summary = getattr(importlib.import_module(module), name)(cfg)
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns it (the group may be gone)
                print(json.dumps(summary, indent=2, default=str))
        elif command in TOOLS:
            try:
                module = importlib.import_module(TOOLS[command])
            except ModuleNotFoundError as e:
                if e.name == TOOLS[command]:
                    raise CozyError(f"command '{command}' is not available in this version") from None
                raise
            rc = module.cli(rest)
            if rc:
                raise SystemExit(rc)
        else:
            raise CozyError(f"unknown command '{command}' (commands: {', '.join([*STAGES, *TOOLS])})")

    return run_guarded(run, debug)


if __name__ == "__main__":
    sys.exit(main())
