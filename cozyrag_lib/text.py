"""Small text helpers shared by chunking, context building and evaluation."""
from __future__ import annotations

import re

# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) before whitespace and
# an upper-case letter, digit or opening quote -- unless the word before is a common abbreviation or
# a single initial ("J. R. R. Tolkien", "e.g. this").
_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "fig",
           "approx", "inc", "ltd", "co", "corp", "mt", "ft", "gen", "col", "lt", "sgt", "u.s", "u.k", "c", "ca"}
_BOUNDARY = re.compile(r"""(?<=[.!?])(["')\]]*)\s+(?=["'(\[]?[A-Z0-9])""")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences; whitespace is normalised, nothing else is changed.

    >>> split_sentences("Paris is the capital. It has 2.1 million people! Dr. Who? Yes")
    ['Paris is the capital.', 'It has 2.1 million people!', 'Dr. Who?', 'Yes']
    """
    text = " ".join(text.split())
    if not text:
        return []
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        head = text[start:m.start()]
        last_word = head.rsplit(" ", 1)[-1].rstrip(".!?").lower()
        if head.endswith(".") and (last_word in _ABBREV or (len(last_word) == 1 and last_word.isalpha())):
            continue
        out.append(text[start:m.end(1)].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]
