"""JSON and JSONL files: read with one-line errors that name the file (and line), write atomically.

Every artefact CoZyRAG writes as JSON or JSONL goes through here, so a damaged or missing file reads
the same everywhere: `error: outputs/runs/demo/qa/train.jsonl:12: not valid JSON; rerun prepare-qa`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from .atomic import atomic_open, atomic_write_text
from .errors import CozyError, first_line


def read_json(path: str | Path, fix: str = "", missing_ok: bool = False) -> Any:
    """One JSON document (a leading byte-order mark is fine); `fix` says what to do when it is bad.

    missing_ok: a missing file gives None instead of an error.
    """
    path, hint = Path(path), f"; {fix}" if fix else ""
    if not path.is_file():
        if missing_ok:
            return None
        raise CozyError(f"{path}: not found{hint}")
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise CozyError(f"{path}: not UTF-8 text (byte {e.start}){hint}") from None
    except (ValueError, RecursionError) as e:
        where = f":{e.lineno}" if hasattr(e, "lineno") else ""
        raise CozyError(f"{path}{where}: not valid JSON ({first_line(e).split(':')[0]}){hint}") from None
    except OSError as e:
        raise CozyError(f"{path}: cannot read ({e.strerror or e}){hint}") from None


def read_json_object(path: str | Path, fix: str = "", required: Iterable[str] = ()) -> dict:
    """A JSON object (a manifest, a config) holding every key in `required`; else a one-line error."""
    obj, hint = read_json(path, fix), f"; {fix}" if fix else ""
    if not isinstance(obj, dict):
        raise CozyError(f"{path}: not a JSON object{hint}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CozyError(f"{path}: missing {', '.join(missing)}{hint}")
    return obj


def iter_jsonl(path: str | Path, fix: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, record) of each non-blank line, streamed; a bad line is an error naming it."""
    path, hint = Path(path), f"; {fix}" if fix else ""
    if not path.is_file():
        raise CozyError(f"{path}: not found{hint}")
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise CozyError(f"{path}:{n}: not UTF-8 text{hint}") from None
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except (ValueError, RecursionError):
                    raise CozyError(f"{path}:{n}: not valid JSON{hint}") from None
    except OSError as e:
        raise CozyError(f"{path}: cannot read ({e.strerror or e}){hint}") from None


def read_jsonl(path: str | Path, fix: str = "", missing_ok: bool = False) -> list:
    """Every record of a JSONL file (missing_ok: a missing file is an empty list)."""
    if missing_ok and not Path(path).is_file():
        return []
    return [rec for _, rec in iter_jsonl(path, fix)]


def write_json(path: str | Path, obj: Any) -> None:
    """Indented JSON, atomically (the old file stays until the new one is complete)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable) -> int:
    """One JSON object per line, atomically; returns the number of rows."""
    n = 0
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def append_jsonl(path: str | Path, rows: Iterable) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def truncate_jsonl(path: str | Path, keep_lines: int | None) -> int:
    """Keep the first keep_lines lines (a resumed run drops rows written after its checkpoint); None empties."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
    lines = lines[:keep_lines or 0]
    atomic_write_text(path, "".join(lines))
    return len(lines)
