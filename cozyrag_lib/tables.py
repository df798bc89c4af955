"""Tables as QA and corpus sources: local Parquet, Arrow and CSV files, and Hugging Face datasets.

A table source is named by its path or by a prefix (in `qa_sources`, `qa_extra` and `corpus_sources`):
  * `file.parquet`, `file.arrow`, `file.csv` (or `parquet:PATH`, `arrow:PATH`, `csv:PATH`: any extension);
  * `hf:NAME[:CONFIG][:SPLIT]` - a dataset of the Hugging Face Hub (or of the local `datasets` cache when
    offline), e.g. `hf:rajpurkar/squad:plain_text:validation`, `hf:google-research-datasets/nq_open::train`;
    the split defaults to `train`.
Every table is streamed row by row (`datasets.load_dataset(..., streaming=True)`), so a corpus of millions
of rows never sits in memory.

Columns are found by their usual names, or mapped with `qa_columns` / `corpus_columns`, a list of
`field=column` (`--qa_columns=question=query,answers=gold`). What each field reads:
    QA:     question (question, query), answers (answers, answer), and optional id, title, context
    corpus: title (title), text (text, context, passage, contents)
An answers cell may be a string, a list of strings, SQuAD's `{"text": [...], "answer_start": [...]}` or
TriviaQA's `{"value": ..., "aliases": [...]}`; an empty answer list is an unanswerable question (skipped
and counted, as in SQuAD v2 files).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from .errors import CozyError, first_line
from .qa_formats import Skip, Skips, make_item, source_stats

FILE_KINDS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".csv": "csv"}
QA_FIELDS = {"question": ("question", "query"), "answers": ("answers", "answer"), "id": ("id",),
             "title": ("title",), "context": ("context",)}
QA_REQUIRED = ("question", "answers")
CORPUS_FIELDS = {"title": ("title",), "text": ("text", "context", "passage", "contents")}
CORPUS_REQUIRED = ("text",)


def table_kind(spec: str) -> str | None:
    """'hf', 'parquet', 'arrow' or 'csv' when `spec` names a table, else None (another kind of source).

    >>> [table_kind(s) for s in ("hf:rajpurkar/squad", "qa.parquet", "csv:qa.txt", "qa.jsonl", "builtin")]
    ['hf', 'parquet', 'csv', None, None]
    """
    prefix, sep, rest = spec.partition(":")
    if sep and rest and prefix in ("hf", *FILE_KINDS.values()):
        return prefix
    return FILE_KINDS.get(Path(spec).suffix.lower())


def table_path(spec: str) -> Path:
    """The file of a file table source (`parquet:x.dat` -> x.dat)."""
    kind = table_kind(spec)
    return Path(spec[len(kind) + 1:] if spec.startswith(f"{kind}:") else spec).expanduser()


def parse_columns(pairs: list[str], fields: dict, what: str) -> dict[str, str]:
    """`["question=query", ...]` as {field: column}; an unknown field or a malformed pair is a CozyError.

    >>> parse_columns(["question=query", "answers=gold"], QA_FIELDS, "qa_columns")
    {'question': 'query', 'answers': 'gold'}
    """
    out = {}
    for pair in pairs:
        name, sep, column = (p.strip() for p in pair.partition("="))
        if not sep or not name or not column:
            raise CozyError(f"config: {what}: '{pair}' is not field=column (e.g. question=query)")
        if name not in fields:
            raise CozyError(f"config: {what}: unknown field '{name}' (fields: {', '.join(fields)})")
        out[name] = column
    return out


def open_table(spec: str) -> Iterator[dict]:
    """The rows of a table source as dicts, streamed; a missing file or dataset is a CozyError naming it."""
    kind = table_kind(spec)
    if kind is None:
        raise CozyError(f"{spec}: not a table source (expected .parquet, .arrow, .csv or hf:NAME)")
    try:
        import datasets  # third-party and slow to import: only when a table is read
    except ImportError:
        raise CozyError(f"{spec}: reading tables needs the `datasets` package (pip install datasets)") from None
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own messages would repeat the error below
    try:
        if kind == "hf":
            name, _, rest = spec[3:].partition(":")
            config, _, split = rest.partition(":")
            rows = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        else:
            path = table_path(spec)
            if not path.is_file():
                raise CozyError(f"{spec}: {'folder, not a table file' if path.is_dir() else 'file not found'}")
            if path.stat().st_size == 0:
                raise CozyError(f"{spec}: file is empty")
            rows = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
        yield from rows
    except CozyError:
        raise
    except Exception as e:  # a broken file, an unknown dataset or split, no network: the library's first line
        raise CozyError(f"{spec}: cannot read this {kind} table ({first_line(e)})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def _column_map(spec: str, row: dict, fields: dict, required: tuple, mapped: dict[str, str], option: str) -> dict:
    """{field: column} for this table: the mapped names, else the first usual name present in the first row."""
    out = {}
    for name, usual in fields.items():
        if name in mapped:
            if mapped[name] not in row:
                raise CozyError(f"{spec}: no column '{mapped[name]}' for {name} ({option}); "
                                f"columns: {', '.join(map(str, row))}")
            out[name] = mapped[name]
        elif found := next((c for c in usual if c in row), None):
            out[name] = found
        elif name in required:
            raise CozyError(f"{spec}: no {name} column (looked for {', '.join(usual)}); columns: "
                            f"{', '.join(map(str, row))}; map one with {option}={name}=COLUMN")
    return out


def answer_texts(value: Any) -> list[str]:
    """The answer strings of one answers cell (see the module docstring); Skip for anything else.

    >>> answer_texts({"text": ["Denver Broncos", "Broncos"], "answer_start": [177, 185]})
    ['Denver Broncos', 'Broncos']
    >>> answer_texts({"value": "Paris", "aliases": ["Paris, France"]})
    ['Paris', 'Paris, France']
    """
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    elif isinstance(value, dict) and "value" in value:
        value = [value["value"], *(value.get("aliases") or [])]
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if value is None:
        return []
    raise Skip("answers cell is not text", f"(got {type(value).__name__})")


def load_qa_table(spec: str, columns: list[str] = ()) -> tuple[list[dict], dict]:
    """QA items of a table source, with the same stats as `qa_formats.load_qa_file` (rows are numbered from 1)."""
    mapped = parse_columns(list(columns), QA_FIELDS, "qa_columns")
    source = spec if table_kind(spec) == "hf" else table_path(spec).name
    items, unanswerable, skips, cols = [], 0, Skips(spec), None
    for n, row in enumerate(open_table(spec), 1):
        cols = cols or _column_map(spec, row, QA_FIELDS, QA_REQUIRED, mapped, "qa_columns")
        cell = {name: row.get(col) for name, col in cols.items()}
        try:
            answers = answer_texts(cell["answers"])
            if not answers:
                unanswerable += 1
                continue
            if not isinstance(cell["question"], str):
                raise Skip("question cell is not text", f"(got {type(cell['question']).__name__})")
            text = {k: cell.get(k) if isinstance(cell.get(k), str) else None for k in ("title", "context")}
            items.append(make_item(source, cell["question"], answers, id=cell.get("id"), **text))
        except Skip as s:
            skips.add(f"row {n}", s)
    if not items:
        why = f"{skips.total} skipped, e.g. {skips.examples[0]}" if skips.examples else \
            f"{unanswerable} unanswerable" if unanswerable else "no rows"
        raise CozyError(f"{spec}: no usable QA pairs in this table ({why})")
    return items, source_stats(spec, table_kind(spec), items, unanswerable, skips)


def read_table_articles(spec: str, columns: list[str], skip) -> Iterator[tuple[str, str]]:
    """(title, text) articles of a table source; rows without text go to `skip(where, why)`, a text repeated
    in consecutive rows (SQuAD's context, one row per question) is read once."""
    mapped = parse_columns(list(columns), CORPUS_FIELDS, "corpus_columns")
    cols, previous = None, None
    for n, row in enumerate(open_table(spec), 1):
        cols = cols or _column_map(spec, row, CORPUS_FIELDS, CORPUS_REQUIRED, mapped, "corpus_columns")
        title, text = row.get(cols.get("title")) if "title" in cols else "", row.get(cols["text"])
        if not isinstance(text, str) or not text.strip():
            skip(f"{spec}: row {n}", "no text")
            continue
        if text != previous:
            previous = text
            yield (title if isinstance(title, str) else ""), text
