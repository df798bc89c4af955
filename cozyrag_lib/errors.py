"""The one exception users see: a clear one-line message, no traceback (unless --debug)."""
from __future__ import annotations

import sys
import traceback
from typing import Callable


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class CozyError(Exception):
    """A problem with the user's input or environment, stated in one line.

    The CLI prints `error: <message>` and exits with status 2; notebooks show the message.
    Name the file (and line) and what is wrong: `qa.tsv:12: no tab between question and answer`.
    """


def run_guarded(fn: Callable[[], object], debug: bool = False) -> int:
    """Run `fn`; turn CozyError into one line on stderr and exit status 2 (traceback only with debug)."""
    try:
        fn()
        return 0
    except CozyError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
