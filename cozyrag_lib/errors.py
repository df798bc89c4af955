"""The one exception users see: a clear one-line message, no traceback (unless --debug)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class CozyError(Exception):
    """A problem with the user's input or environment, stated in one line.

    The CLI prints `error: <message>` and exits with status 2; notebooks show the message.
    Name the file (and line) and what is wrong: `qa.tsv:12: no tab between question and answer`.
    """
