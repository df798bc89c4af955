"""The one exception users see: a clear one-line message, no traceback (unless --debug)."""
from __future__ import annotations

import re
import sys
import traceback
from typing import Callable


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def faiss_reason(e: BaseException) -> str:
    """The readable tail of a FAISS C++ error: drop 'Error in <signature> at file.cpp:123: '."""
    line = re.sub(r"^Error in .*? at \S+:\d+: ", "", first_line(e))
    return re.sub(r"^Error: '.*?' failed: ", "", line)


class CozyError(Exception):
    """A problem with the user's input or environment, stated in one line.

    The CLI prints `error: <message>` and exits with status 2; notebooks show the message.
    Name the file (and line) and what is wrong: `qa.tsv:12: no tab between question and answer`.
    """


def run_guarded(fn: Callable[[], object], debug: bool = False) -> int:
    """Run `fn`; its exit status. A CozyError is one line on stderr and status 2 (after its traceback with
    `debug`, the config key `debug` that `--debug` sets: see `cli.debug_requested`); SystemExit (`--help`)
    gives its status, so in-process callers get a number too."""
    try:
        fn()
        return 0
    except CozyError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
