"""QA files: the four formats stage 1 reads, each parsed into the record every importer yields.

    {"id": str, "question": str, "answers": [str, ...], "title": str (optional), "context": str (optional),
     "source": str}   (prepare-qa adds "qtype" and "rule" for the built-in set; a split read back keeps them)

Formats (`cfg.qa_format` names one, or "auto" guesses it from the name and the first line):
  * squad   - SQuAD v1.1/v2.0 JSON (`data[].title`, `paragraphs[].context`, `qas[].id/question/answers[].text`);
              v2 questions marked `is_impossible` are skipped and counted;
  * qabot   - text blocks `Q: ...` / `A: ...` separated by blank lines (several A: lines = several answers);
  * tsv     - `question<TAB>answer[<TAB>answer ...]` a line, or `question<TAB>["answer", ...]`; an optional
              `question<TAB>answer` header;
  * jsonl   - one object a line with `question` and `answer` (a string or list, NQ-open style) or `answers`.

A problem with a whole file (missing, empty, binary, not UTF-8, not JSON, SQuAD layout broken, nothing usable)
is a CozyError naming the file; a bad line in an otherwise good file is skipped, counted and reported with its
file:line (`Skips`).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm  # text bars: they also stream through papermill, where widget bars stay invisible

from .errors import CozyError

FORMATS = ("squad", "qabot", "tsv", "jsonl")
MAX_CHARS = 10_000  # longer questions, answers or text lines are rejected (a broken file, not a question)
MAX_EXAMPLES = 20  # skipped lines reported by file:line in the summary (the rest are only counted)
PROGRESS_MIN = 50_000  # show a progress bar for files with at least this many lines or questions


# ----------------------------------------------------------------------------------------------------------
# ids, skipped lines, items

def make_id(source: str, question: str, answers: list[str]) -> str:
    """A stable id for sources that bring none: `{source}-{12 hex digits of sha1(question, answers)}`."""
    digest = hashlib.sha1("\n".join([question, *answers]).encode("utf-8")).hexdigest()
    return f"{source}-{digest[:12]}"


class Skip(Exception):
    """One bad record (raised by the parsers and `make_item`): `kind` is counted, `detail` only shown in the examples."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(kind)
        self.kind, self.detail = kind, detail


class Skips:
    """Counted skips of bad records, with the first few as `file:line: reason` examples."""

    def __init__(self, name: str):
        self.name, self.counts, self.examples = name, Counter(), []

    def add(self, where: int | str, skip: Skip) -> None:
        self.counts[skip.kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            sep = ":" if isinstance(where, int) else ": "
            self.examples.append(f"{self.name}{sep}{where}: {skip.kind}{' ' + skip.detail if skip.detail else ''}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _clean(question: str, answers: Iterable[str]) -> tuple[str, list[str]]:
    """Stripped question and answers (empty answers and repeats dropped); Skip when nothing usable is left."""
    q = question.strip()
    if not q:
        raise Skip("empty question")
    if len(q) > MAX_CHARS:
        raise Skip("question too long", f"({len(q):,} characters, limit {MAX_CHARS:,})")
    out = []
    for a in answers:
        a = a.strip()
        if len(a) > MAX_CHARS:
            raise Skip("answer too long", f"({len(a):,} characters, limit {MAX_CHARS:,})")
        if a and a not in out:
            out.append(a)
    if not out:
        raise Skip("empty answer")
    return q, out


def make_item(source: str, question: str, answers: Iterable[str], id: Any = None, title: str | None = None,
              context: str | None = None) -> dict:
    """The record of one QA pair (cleaned by `_clean`; Skip when nothing usable is left); id from make_id if none."""
    q, a = _clean(question, answers)
    item = {"id": str(id) if id is not None else make_id(source, q, a), "question": q, "answers": a}
    if title and title.strip():
        item["title"] = title.strip()
    if context and context.strip():
        item["context"] = context.strip()
    item["source"] = source
    return item


def _progress(items: list, desc: str) -> Iterable:
    """A progress bar only for inputs big enough to take a while."""
    return tqdm(items, desc=desc, unit="line", disable=len(items) < PROGRESS_MIN, leave=False)


# ----------------------------------------------------------------------------------------------------------
# reading a file

def read_text(path: str | Path) -> str:
    """A QA file's text, or a one-line CozyError saying why it cannot be one (missing, empty, binary, not UTF-8)."""
    path = Path(path)
    if not path.exists():
        raise CozyError(f"{path}: QA file not found")
    if path.is_dir():
        raise CozyError(f"{path}: is a folder, not a QA file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CozyError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data.strip():
        raise CozyError(f"{path}: file is empty")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CozyError(f"{path}: binary file (NUL byte at byte {nul}), not a UTF-8 text QA file")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark at the start is harmless
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise CozyError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start}); "
                        f"save the file as UTF-8") from None
    if not text.strip():
        raise CozyError(f"{path}: file is empty")
    return text


def _lines(text: str) -> list[str]:
    """Lines split on \\n only, so line numbers match what editors show (str.splitlines also splits on \\x0c etc.)."""
    return [line.rstrip("\r") for line in text.split("\n")]


def _looks_like_jsonl(first_line: str) -> bool:
    try:
        rec = json.loads(first_line)
    except (ValueError, RecursionError):
        return False
    return isinstance(rec, dict) and "question" in rec


def detect_format(path: str | Path, text: str | None = None) -> str:
    """Guess a QA file's format from its extension and first non-blank line.

    `.jsonl`/`.ndjson` -> jsonl, `.tsv` -> tsv, `.json` -> squad (jsonl when its first line is a record with a
    question); any other extension: a JSON object -> squad/jsonl, `Q:` -> qabot, a tab -> tsv.
    """
    text = read_text(path) if text is None else text
    ext = Path(path).suffix.lower()
    first = next((line.strip() for line in _lines(text) if line.strip()), "")
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext == ".tsv":
        return "tsv"
    if ext == ".json" or first.startswith(("{", "[")):
        return "jsonl" if _looks_like_jsonl(first) else "squad"
    if re.match(r"[Qq]:", first):
        return "qabot"
    if "\t" in first:
        return "tsv"
    raise CozyError(f"{path}: cannot tell the QA format from the name or the first line; expected SQuAD .json, "
                    f".jsonl, .tsv or Q:/A: text (or set qa_format to one of {', '.join(FORMATS)})")


# ----------------------------------------------------------------------------------------------------------
# the four file formats; each returns (items, unanswerable count) and records skipped records in `skips`

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


def _json_type(v: Any) -> str:
    return _JSON_TYPES.get(type(v), type(v).__name__)


def parse_squad(path: str | Path, text: str, source: str, skips: Skips) -> tuple[list[dict], int]:
    """SQuAD v1.1/v2.0 JSON. A broken layout is an error naming its JSON path (`data[3].paragraphs[0]...`)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise CozyError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise CozyError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. a 5000-digit number
        raise CozyError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None

    def need(obj: dict, key: str, types: tuple, where: str) -> Any:
        if key not in obj:
            raise CozyError(f"{path}: {where + ': ' if where else ''}'{key}' missing (not a SQuAD file?)")
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(dict.fromkeys(_JSON_TYPES[t] for t in types))
            raise CozyError(f"{path}: {where + '.' if where else ''}{key}: expected {names}, got {_json_type(value)}")
        return value

    def expect_object(obj: Any, where: str) -> dict:
        if not isinstance(obj, dict):
            raise CozyError(f"{path}: {where}: expected an object, got {_json_type(obj)}")
        return obj

    items, unanswerable = [], 0
    if not isinstance(doc, dict):
        raise CozyError(f"{path}: top level: expected an object, got {_json_type(doc)} (a SQuAD file is an object "
                        f"with a 'data' list; one JSON record a line belongs in a .jsonl file)")
    for i, article in enumerate(need(doc, "data", (list,), "")):
        where_a = f"data[{i}]"
        title = need(expect_object(article, where_a), "title", (str,), where_a)
        for j, para in enumerate(need(article, "paragraphs", (list,), where_a)):
            where_p = f"{where_a}.paragraphs[{j}]"
            context = need(expect_object(para, where_p), "context", (str,), where_p)
            for k, qa in enumerate(need(para, "qas", (list,), where_p)):
                where_q = f"{where_p}.qas[{k}]"
                question = need(expect_object(qa, where_q), "question", (str,), where_q)
                qid = need(qa, "id", (str, int), where_q)
                texts = []
                for m, ans in enumerate(need(qa, "answers", (list,), where_q)):
                    where_ans = f"{where_q}.answers[{m}]"
                    texts.append(need(expect_object(ans, where_ans), "text", (str,), where_ans))
                impossible = need(qa, "is_impossible", (bool,), where_q) if "is_impossible" in qa else False
                if impossible or not texts:  # SQuAD v2: no answer in the paragraph
                    unanswerable += 1
                    continue
                try:
                    items.append(make_item(source, question, texts, id=qid, title=title, context=context))
                except Skip as s:
                    skips.add(where_q, s)
    return items, unanswerable


def parse_qabot(path: str | Path, text: str, source: str, skips: Skips) -> tuple[list[dict], int]:
    """`Q: question` / `A: answer` blocks; lines without a prefix continue the line before them."""
    items: list[dict] = []
    block: dict | None = None  # {"line": n, "q": str, "a": [str, ...]}

    def close() -> None:
        nonlocal block
        if block is not None:
            try:
                if not block["a"]:
                    raise Skip("question without an answer", "(no 'A:' line)") if block["q"].strip() \
                        else Skip("empty question")
                items.append(make_item(source, block["q"], block["a"]))
            except Skip as s:
                skips.add(block["line"], s)
        block = None

    for n, line in enumerate(_progress(_lines(text), str(path)), 1):
        stripped = line.strip()
        if not stripped:
            close()
        elif stripped[:2] in ("Q:", "q:"):
            close()
            block = {"line": n, "q": stripped[2:], "a": []}
        elif stripped[:2] in ("A:", "a:"):
            if block is None:
                skips.add(n, Skip("answer without a question", "('A:' line outside a Q:/A: block)"))
            else:
                block["a"].append(stripped[2:])
        elif block is not None:  # a wrapped line: continue the answer (or the question, before any A:)
            if block["a"]:
                block["a"][-1] += " " + stripped
            else:
                block["q"] += " " + stripped
        else:
            skips.add(n, Skip("text outside a Q:/A: block"))
    close()
    return items, 0


def _tsv_answers(fields: list[str]) -> list[str]:
    """Answer columns; a single column holding a JSON list (`["a", "b"]`) is that list."""
    if len(fields) == 1 and fields[0].strip().startswith("["):
        try:
            value = json.loads(fields[0])
        except (ValueError, RecursionError):
            return fields
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return fields


def parse_tsv(path: str | Path, text: str, source: str, skips: Skips) -> tuple[list[dict], int]:
    """`question<TAB>answer` lines, an optional header, blank lines ignored."""
    items, header_seen = [], False
    for n, line in enumerate(_progress(_lines(text), str(path)), 1):
        if not line.strip():
            continue
        if not header_seen:
            header_seen = True
            if [f.strip().lower() for f in line.split("\t")[:2]] in (["question", "answer"], ["question", "answers"]):
                continue
        try:
            if len(line) > MAX_CHARS:
                raise Skip("line too long", f"({len(line):,} characters, limit {MAX_CHARS:,})")
            if "\t" not in line:
                raise Skip("no tab between question and answer")
            question, *answers = line.split("\t")
            items.append(make_item(source, question, _tsv_answers(answers)))
        except Skip as s:
            skips.add(n, s)
    return items, 0


def _jsonl_answers(rec: dict) -> list[str]:
    key = "answers" if "answers" in rec else "answer" if "answer" in rec else None
    if key is None:
        raise Skip("no 'answer' or 'answers'")
    value = rec[key]
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise Skip(f"'{key}' is not a string or list", f"(got {_json_type(value)})")
    out = []
    for a in value:  # strings, or SQuAD-style {"text": ...} objects
        if isinstance(a, dict) and isinstance(a.get("text"), str):
            a = a["text"]
        if not isinstance(a, str):
            raise Skip(f"'{key}' holds something other than strings", f"(got {_json_type(a)})")
        out.append(a)
    return out


def parse_jsonl(path: str | Path, text: str, source: str, skips: Skips) -> tuple[list[dict], int]:
    """One JSON object a line: `question` and `answer` (str or list) or `answers`; optional id, title, context,
    and source / qtype / rule (as prepare-qa writes them; `source` otherwise is the file's name)."""
    items = []
    for n, line in enumerate(_progress(_lines(text), str(path)), 1):
        if not line.strip():
            continue
        try:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise Skip("bad JSON", f"({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise Skip("bad JSON", "(nested too deeply)") from None
            except ValueError:  # e.g. a 5000-digit number
                raise Skip("bad JSON") from None
            if not isinstance(rec, dict):
                raise Skip("not a JSON object", f"(got {_json_type(rec)})")
            if not isinstance(rec.get("question"), str):
                raise Skip("'question' missing or not a string")
            for key, types in (("id", (str, int)), ("title", (str,)), ("context", (str,))):
                if key in rec and (not isinstance(rec[key], types) or isinstance(rec[key], bool)):
                    raise Skip(f"'{key}' has the wrong type", f"(got {_json_type(rec[key])})")
            item = make_item(source, rec["question"], _jsonl_answers(rec), id=rec.get("id"), title=rec.get("title"),
                         context=rec.get("context"))
            for key in ("source", "qtype", "rule"):  # a split written by prepare-qa keeps what it knew
                if isinstance(rec.get(key), str) and rec[key].strip():
                    item[key] = rec[key].strip()
            items.append(item)
        except Skip as s:
            skips.add(n, s)
    return items, 0


PARSERS = {"squad": parse_squad, "qabot": parse_qabot, "tsv": parse_tsv, "jsonl": parse_jsonl}


def load_qa_file(path: str | Path, fmt: str = "auto") -> tuple[list[dict], dict]:
    """Read one QA file into normalised items; `stats` counts what was kept, skipped and why.

    Example (a JSON-lines file whose 7th line is broken):
        items, stats = load_qa_file("nq.jsonl")
        items[0]                -> {'id': 'nq.jsonl-3b1f...', 'question': 'who sings ...', 'answers': ['Poison'],
                                    'source': 'nq.jsonl'}
        stats["skip_examples"]  -> ['nq.jsonl:7: bad JSON (Expecting value at column 1)']
    """
    if fmt != "auto" and fmt not in PARSERS:
        raise CozyError(f"{path}: unknown QA format '{fmt}' (known: auto, {', '.join(FORMATS)})")
    text = read_text(path)
    fmt = detect_format(path, text) if fmt == "auto" else fmt
    source, skips = Path(path).name, Skips(str(path))
    items, unanswerable = PARSERS[fmt](path, text, source, skips)
    if not items:
        why = f"{skips.total} skipped, e.g. {skips.examples[0]}" if skips.examples else \
            f"{unanswerable} unanswerable" if unanswerable else "no records found"
        raise CozyError(f"{path}: no usable QA pairs in this {fmt} file ({why})")
    return items, source_stats(str(path), fmt, items, unanswerable, skips)


def source_stats(path: str, fmt: str, items: list, unanswerable: int, skips: Skips) -> dict:
    """What is reported of one QA source: where, which format, items kept, unanswerable, skipped and why."""
    return {"path": path, "format": fmt, "items": len(items), "unanswerable": unanswerable,
            "skipped": skips.total, "skip_reasons": dict(skips.counts), "skip_examples": skips.examples}

