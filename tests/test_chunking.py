"""Stage 2: sources -> sentence-aware passages within the retriever's token budget, with stable ids."""
from __future__ import annotations

import bz2
import hashlib
import inspect
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, run_cli
from cozyrag_lib.chunking import (Chunker, article_sentences, chunk_corpus, load_retriever_tokenizer,
                                  pack_sentences, read_passages)
from cozyrag_lib.config import load_config
from cozyrag_lib.corpus import embedded_corpus, read_articles, resolve_source
from cozyrag_lib.errors import CozyError
from cozyrag_lib.paths import RunPaths

DUMP = FIXTURES / "corpus" / "mini-enwiki-pages-articles.xml"
WIKI_TITLES = {"Honey bee", "Basalt", "Ada Lovelace", "Lake Baikal"}  # the redirect and the template page are not articles


@pytest.fixture(scope="module")
def tokenizer():
    return load_retriever_tokenizer("embedded:all-minilm-l6-v2")


@pytest.fixture(scope="module")
def wiki_outputs(tmp_path_factory) -> dict[str, Path]:
    """The fixture dump run through the real wikiextractor (PyPI 3.1.0 runs on Python 3.11 as is,
    templates expanded; no --no-templates needed), in its default <doc> format and with --json."""
    root = tmp_path_factory.mktemp("wikiextractor")
    dump = root / "dump.xml"
    shutil.copy(DUMP, dump)
    outs = {}
    for fmt, extra in [("doc", []), ("json", ["--json"])]:
        cmd = [sys.executable, "-m", "wikiextractor.WikiExtractor", str(dump), *extra, "--processes", "1", "-q",
               "-o", str(root / fmt)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs[fmt] = root / fmt
    return outs


def make_cfg(tmp_path: Path, sources: list, run: str = "run", **kw):
    return load_config("tiny", out_root=str(tmp_path / "runs"), run_name=run,
                       corpus_sources=[str(s) for s in sources], **kw)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_squad(path: Path, articles: dict[str, list[str]]) -> Path:
    data = {"version": "1.1", "data": [
        {"title": t, "paragraphs": [{"context": c, "qas": [{"id": f"{t}{i}", "question": "Q?",
                                                            "answers": [{"text": c[:5], "answer_start": 0}]}]}
                                    for i, c in enumerate(ctxs)]}
        for t, ctxs in articles.items()]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


LONG = ("The lighthouse stood on a granite ledge above the harbour. Its lamp was first lit in 1841 by the keeper. "
        "Ships approaching from the west used it to avoid the shoals. A storm in 1903 cracked the lantern glass. "
        "The tower was rebuilt with reinforced concrete two years later. Today the light is automated and solar powered. "
        "Visitors can climb the 112 steps during the summer months. A small museum displays the original lens.")


# ---------------------------------------------------------------------------------------------- sources

def test_wikiextractor_both_formats_give_the_same_passages(wiki_outputs, tmp_path):
    summaries, passages = {}, {}
    for fmt, folder in wiki_outputs.items():
        cfg = make_cfg(tmp_path, [folder], run=fmt, chunk_max_tokens=48)
        summaries[fmt] = chunk_corpus(cfg)
        passages[fmt] = read_passages(cfg.paths.passages)
    doc = passages["doc"]
    assert {p["title"] for p in doc} == WIKI_TITLES
    assert summaries["doc"]["articles"] == 4 and summaries["doc"]["sources"][0]["kind"] == "wikiextractor"
    bee = [p["text"] for p in doc if p["title"] == "Honey bee"]
    assert len(bee) >= 3  # 48 tokens cut the article into several passages
    assert bee[0].startswith("A honey bee (also spelled honeybee) is a eusocial flying insect")  # title line skipped
    assert any("waggle dance" in t for t in bee)
    assert not any("<doc" in p["text"] or "</doc>" in p["text"] or "[[" in p["text"] for p in doc)
    assert passages["json"] == doc  # same text either way, so same passages and ids


def test_wikiextractor_doc_reader_details(tmp_path):
    """Escaped titles, the repeated title line, paragraphs as sentence breaks, nested folders, .bz2 files."""
    folder = tmp_path / "extracted"
    (folder / "AA").mkdir(parents=True)
    (folder / "AB").mkdir()
    (folder / "AA" / "wiki_00").write_text(
        '<doc id="1" url="https://en.wikipedia.org/wiki?curid=1" title="AT&amp;T &quot;Bell&quot;">\n'
        'AT&amp;T &quot;Bell&quot;\n\nAT&T is a telephone company\nHistory.\nIt was founded in 1885.\n</doc>\n',
        encoding="utf-8")
    (folder / "AB" / "wiki_00.bz2").write_bytes(bz2.compress(
        b'<doc id="2" url="u" title="Zebra">\nZebra\n\nZebras are striped horses.\n</doc>\n'))
    (folder / "AA" / ".hidden").write_text("garbage", encoding="utf-8")
    articles = list(read_articles(resolve_source(str(folder))))
    assert articles == [('AT&T "Bell"', "AT&T is a telephone company\nHistory.\nIt was founded in 1885."),
                        ("Zebra", "Zebras are striped horses.")]
    assert article_sentences(articles[0][1]) == ["AT&T is a telephone company", "History.", "It was founded in 1885."]


def test_jsonl_source_counts_malformed_lines(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"title": "Lighthouse", "text": LONG}, "", "{not json", {"title": "No text"},
        {"title": "Harbour", "text": "The harbour was dredged in 1920 to admit larger steamers."}])
    summary = chunk_corpus(make_cfg(tmp_path, [path]))
    assert summary["articles"] == 2 and summary["skipped_lines"] == 2
    assert summary["sources"][0]["skipped"] == [f"{path}:3: not valid JSON (skipped)",
                                                f"{path}:4: expected an object with string 'title' and 'text' (skipped)"]


def test_squad_source_real_file(squad_file, tmp_path):
    data = json.loads(squad_file.read_text(encoding="utf-8"))["data"]
    contexts = {p["context"] for a in data for p in a["paragraphs"]}
    articles = list(read_articles(resolve_source(str(squad_file))))
    assert len(articles) == len(contexts)  # one article per distinct context
    assert [t for t, _ in articles[:1]] == [data[0]["title"]]
    summary = chunk_corpus(make_cfg(tmp_path, [squad_file], max_articles=0))
    assert summary["sources"][0]["kind"] == "squad" and summary["articles"] == len(contexts)
    assert summary["passages"] >= len(contexts) - summary["dropped_short"]


def test_squad_source_dedupes_contexts(tmp_path):
    path = write_squad(tmp_path / "s.json", {"Lighthouse": [LONG, LONG, "A second paragraph about the keeper's house."],
                                             "Harbour": [LONG]})
    assert [t for t, _ in read_articles(resolve_source(str(path)))] == ["Lighthouse", "Lighthouse"]


def test_embedded_takes_first_n_in_sorted_title_order(tmp_path):
    cfg = make_cfg(tmp_path, ["embedded"], max_articles=7)
    summary = chunk_corpus(cfg)
    titles = list(dict.fromkeys(p["title"] for p in read_passages(cfg.paths.passages)))
    assert summary["articles"] == 7
    assert titles == sorted(embedded_corpus())[:7]


@pytest.mark.parametrize("descriptions", [True, False])
def test_embedded_passages_lead_with_the_description_line(tmp_path, descriptions):
    """The first passage of an embedded article starts "Title: description." (off: with its lead), later ones never."""
    cfg = make_cfg(tmp_path, ["embedded"], max_articles=40, chunk_max_tokens=128, embedded_descriptions=descriptions)
    chunk_corpus(cfg)
    data, firsts, seen = embedded_corpus(), 0, set()
    for p in read_passages(cfg.paths.passages):
        art = data[p["title"]]
        line = f"{p['title']}: {art['description'].strip()}"
        if p["title"] not in seen:  # the article's first passage
            seen.add(p["title"])
            led = descriptions and art["description"].strip()
            assert p["text"].startswith(line) == bool(led), p
            assert led or p["text"].startswith(art["extract"].split()[0]), p
            firsts += bool(led)
        else:
            assert not p["text"].startswith(line), p
    assert len(seen) == 40 and firsts >= (35 if descriptions else 0)


def test_several_sources_in_order(tmp_path):
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"title": "Lighthouse", "text": LONG}])
    squad = write_squad(tmp_path / "s.json", {"Harbour": ["The harbour was dredged in 1920 to admit larger steamers."]})
    cfg = make_cfg(tmp_path, [jsonl, "embedded", f"squad:{squad}"], max_articles=3)
    summary = chunk_corpus(cfg)
    titles = [p["title"] for p in read_passages(cfg.paths.passages)]
    counts = [s["passages"] for s in summary["sources"]]
    assert [s["kind"] for s in summary["sources"]] == ["jsonl", "embedded", "squad"]
    assert sum(counts) == summary["passages"] == len(titles)
    assert set(titles[:counts[0]]) == {"Lighthouse"} and titles[-1] == "Harbour"
    assert summary["articles"] == 1 + 3 + 1
    out = cfg.paths.passages_dir
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "passages.jsonl", "summary.json"]
    assert not (cfg.run_dir / ".passages.parts").exists()
    assert json.loads(cfg.paths.config(out).read_text())["corpus_sources"] == cfg.corpus_sources
    assert json.loads(cfg.paths.summary(out).read_text())["passages"] == summary["passages"]


def test_a_run_of_the_flat_layout_is_moved_into_passages(tmp_path):
    """An earlier run's passages.jsonl and passages.config.json beside qa/ move, whole, into passages/."""
    short = write_jsonl(tmp_path / "short.jsonl", [{"title": "A", "text": "Tiny."}])
    cfg = make_cfg(tmp_path, [short])
    old = '{"id": "old-0", "title": "Old", "text": "an earlier run"}\n'
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "passages.jsonl").write_text(old, encoding="utf-8")
    (cfg.run_dir / "passages.config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CozyError, match="short.jsonl: no passages"):  # moved first, then kept by the failed run
        chunk_corpus(cfg)
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["passages"]  # and no .passages.parts left
    assert cfg.paths.passages.read_text(encoding="utf-8") == old
    assert cfg.paths.config(cfg.paths.passages_dir).read_text() == "{}"


# ---------------------------------------------------------------------------------------------- passages

def test_ids_stable_and_unique(tmp_path):
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"title": "Lighthouse", "text": LONG},
                                               {"title": "Lighthouse", "text": LONG[::-1].capitalize()}])
    outs = []
    for run in ("a", "b"):
        cfg = make_cfg(tmp_path, ["embedded", jsonl], run=run, max_articles=20, chunk_max_tokens=40)
        chunk_corpus(cfg)
        outs.append(cfg.paths.passages)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    passages = read_passages(outs[0])
    ids = [p["id"] for p in passages]
    assert len(set(ids)) == len(ids)
    key = hashlib.sha1(b"Lighthouse").hexdigest()[:10]
    light = [p["id"] for p in passages if p["title"] == "Lighthouse"]
    assert light == [f"{key}-{n}" for n in range(len(light))]  # a repeated title keeps counting


def test_min_length_rule(tmp_path):
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"title": "Stub", "text": "Too short."},
                                               {"title": "Lighthouse", "text": LONG}])
    cfg = make_cfg(tmp_path, [jsonl], min_passage_chars=30)
    summary = chunk_corpus(cfg)
    passages = read_passages(cfg.paths.passages)
    assert summary["dropped_short"] == 1 and {p["title"] for p in passages} == {"Lighthouse"}
    assert all(len(p["text"]) >= 30 for p in passages)


def test_token_budget_respected(tmp_path, tokenizer):
    words = " ".join(f"word{i}" for i in range(400))  # one 'sentence' far over the budget
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"title": "Run-on", "text": words}])
    cfg = make_cfg(tmp_path, ["embedded", jsonl], max_articles=200, chunk_max_tokens=24, chunk_overlap_sentences=0,
                   min_passage_chars=1)
    summary = chunk_corpus(cfg)
    passages = read_passages(cfg.paths.passages)
    counts = Chunker(tokenizer, 24).count_tokens([p["text"] for p in passages])
    assert max(counts) <= 24 and summary["tokens"]["max"] == max(counts)
    assert summary["long_sentences_split"] >= 1 and summary["articles_repacked"] == 0
    runon = " ".join(p["text"] for p in passages if p["title"] == "Run-on")
    assert runon.split() == words.split()  # split on word boundaries, nothing lost


def test_overlap_repeats_boundary_sentences(tokenizer):
    sentences = article_sentences(LONG)
    with_overlap = Chunker(tokenizer, 30, overlap_sentences=1).chunk(LONG)
    assert len(with_overlap) >= 3
    for a, b in zip(with_overlap, with_overlap[1:]):
        assert article_sentences(b)[0] == article_sentences(a)[-1]
    without = Chunker(tokenizer, 30, overlap_sentences=0).chunk(LONG)
    assert [s for p in without for s in article_sentences(p)] == sentences


@pytest.mark.parametrize("budget", [1, 2, 4, 7])
def test_split_long_cuts_words_into_fitting_pieces(tokenizer, budget):
    sentence = "Pneumonoultramicroscopicsilicovolcanoconiosis is unbelievably incomprehensible, étonnamment."
    chunker = Chunker(tokenizer, budget)
    pieces = chunker.split_long(sentence)
    assert all(0 < n <= budget for _, n in pieces)
    assert [n for _, n in pieces] == chunker.count_tokens([p for p, _ in pieces])
    assert "".join(p for p, _ in pieces).replace(" ", "") == sentence.replace(" ", "")  # only spaces at cuts lost


def test_split_long_moves_past_a_character_over_the_budget(tokenizer):
    """WordPiece splits 토 into two jamo tokens of one character span: at a budget of 1 it cannot fit, and
    cutting at its tokens made no progress (an endless loop, found by the fuzz test). It stands alone now."""
    chunker = Chunker(tokenizer, 1)
    pieces = chunker.split_long("토F²")
    assert [p for p, _ in pieces] == ["토", "F", "²"]
    assert [n for _, n in pieces] == chunker.count_tokens(["토", "F", "²"]) == [2, 1, 1]


def test_fast_packing_matches_exact_packing(tokenizer):
    """Reference equivalence: summing sentence counts (fast) packs exactly like tokenizing every candidate."""
    data = embedded_corpus()
    texts = [data[t]["extract"] for t in sorted(data)[:150]]
    chunker = Chunker(tokenizer, 40, overlap_sentences=1)
    for text in texts:
        units = [(s, n) for s, n in zip(article_sentences(text), chunker.count_tokens(article_sentences(text)))]
        units = [u for s, n in units for u in ([(s, n)] if n <= 40 else chunker.split_long(s))]
        assert chunker._pack_additive(units) == chunker._pack_exact([s for s, _ in units])
    chunker.chunk_batch(texts)
    assert chunker.repacked == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10), max_size=12), st.integers(1, 25), st.integers(0, 3))
def test_pack_sentences_properties(lengths, budget, overlap):
    prefix = [0]
    for n in lengths:
        prefix.append(prefix[-1] + n)
    spans = pack_sentences(len(lengths), lambda i, j: prefix[j] - prefix[i] <= budget, overlap)
    if not lengths:
        assert spans == []
        return
    assert spans[0][0] == 0 and spans[-1][1] == len(lengths)
    for (i, j), (k, m) in zip(spans, spans[1:]):
        assert i < k and j < m and k <= j  # progress, new sentences every time, no gaps
        assert j - k <= overlap
    for i, j in spans:
        assert j - i == 1 or prefix[j] - prefix[i] <= budget


def test_sources_stream(tmp_path):
    """A generator that yields the first article before it has read the broken line 3."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(json.dumps({"title": "A", "text": LONG}).encode() + b"\n\n" + b'{"title": "B", "text": "\xff"}\n')
    articles = read_articles(resolve_source(str(path)))
    assert inspect.isgenerator(articles)
    assert next(articles)[0] == "A"
    with pytest.raises(CozyError, match=r"c\.jsonl:3: not UTF-8"):
        next(articles)


# ---------------------------------------------------------------------------------------------- bad input

def _bad_sources(tmp: Path) -> dict[str, tuple[str, str]]:
    """case -> (corpus_sources value, text the one-line error must contain)."""
    (tmp / "empty.jsonl").write_bytes(b"")
    (tmp / "empty_dir").mkdir()
    (tmp / "latin1.jsonl").write_bytes(json.dumps({"title": "A", "text": LONG}).encode() + b"\n" + "{\"title\": \"Caf\xe9\"}".encode("latin-1") + b"\n")
    (tmp / "notes.txt").write_text("some notes", encoding="utf-8")
    write_jsonl(tmp / "short.jsonl", [{"title": "A", "text": "Tiny."}, {"title": "B", "text": "Also tiny."}])
    (tmp / "broken.json").write_text('{"data": [', encoding="utf-8")
    (tmp / "notsquad.json").write_text('[1, 2]', encoding="utf-8")
    (tmp / "plain").mkdir()
    (tmp / "plain" / "wiki_00").write_text("just some text\n", encoding="utf-8")
    (tmp / "allbad.jsonl").write_text("{oops\n[1]\n", encoding="utf-8")
    return {
        "missing": (str(tmp / "nope.jsonl"), "nope.jsonl: corpus source not found"),
        "empty file": (str(tmp / "empty.jsonl"), "empty.jsonl: empty file"),
        "empty folder": (str(tmp / "empty_dir"), "empty_dir: empty folder"),
        "not utf-8": (str(tmp / "latin1.jsonl"), "latin1.jsonl:2: not UTF-8"),
        "unknown kind": (str(tmp / "notes.txt"), "notes.txt: unknown corpus source kind"),
        "no passages": (str(tmp / "short.jsonl"), "short.jsonl: no passages"),
        "corrupt json": (str(tmp / "broken.json"), "broken.json:1: not valid JSON"),
        "not squad": (str(tmp / "notsquad.json"), "notsquad.json: not a SQuAD file"),
        "not wikiextractor": (str(tmp / "plain"), "wiki_00:1: not wikiextractor output"),
        "only malformed lines": (str(tmp / "allbad.jsonl"), "allbad.jsonl: no articles found (2 malformed lines"),
        "raw dump": (str(DUMP), "raw MediaWiki dump"),
    }


# Every case through the real CLI code path; the first five in a subprocess (exit status, stderr, no
# Traceback), the rest in this process (`main()`, same error handling) to keep the file fast.
SUBPROCESS_CASES = ["missing", "not utf-8", "unknown kind", "no passages", "corrupt json"]
IN_PROCESS_CASES = ["empty file", "empty folder", "not squad", "not wikiextractor", "only malformed lines", "raw dump"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES + IN_PROCESS_CASES)
def test_cli_bad_input_is_one_line_error(case, tmp_path, capsys):
    from cozyrag_lib.__main__ import main

    source, message = _bad_sources(tmp_path)[case]
    out_root = tmp_path / "runs"
    run = RunPaths(out_root / "tiny")
    existing = run.passages
    existing.parent.mkdir(parents=True)
    existing.write_text('{"id": "old-0", "title": "Old", "text": "an earlier run, must survive"}\n', encoding="utf-8")
    before = existing.read_bytes()
    args = ["chunk", "--preset=tiny", f"--out_root={out_root}", f"--corpus_sources={source}"]
    if case in SUBPROCESS_CASES:
        proc = run_cli(*args)
        rc, stderr = proc.returncode, proc.stderr
    else:
        rc, stderr = main(args), capsys.readouterr().err
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert existing.read_bytes() == before
    assert not (run.root / ".passages.parts").exists()


def test_cli_skips_malformed_json_line_with_warning(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"title": "Lighthouse", "text": LONG}, '{"title": "Broken", '])
    proc = run_cli("chunk", "--preset=tiny", f"--out_root={tmp_path / 'runs'}", f"--corpus_sources={path}")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {path}:2: not valid JSON (skipped)" in proc.stderr
    assert json.loads(proc.stdout)["skipped_lines"] == 1


def test_read_passages_errors(tmp_path):
    with pytest.raises(CozyError, match="passages file not found"):
        read_passages(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(CozyError, match="empty.jsonl: no passages"):
        read_passages(tmp_path / "empty.jsonl")
    (tmp_path / "cut.jsonl").write_text('{"id": "a-0", "title": "A", "text": "x"}\n{"id": "a-1", "ti', encoding="utf-8")
    with pytest.raises(CozyError, match=r"cut.jsonl:2: not valid JSON"):
        read_passages(tmp_path / "cut.jsonl")
    (tmp_path / "shape.jsonl").write_text('{"id": 3, "title": "A", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(CozyError, match=r"shape.jsonl:1: expected an object"):
        read_passages(tmp_path / "shape.jsonl")


# ---------------------------------------------------------------------------------------------- fuzz

sentence_like = st.lists(
    st.tuples(st.sampled_from(["", "The", "A", "Dr.", "J.", "In 1990,", "\u00c9mile", "\u65e5\u672c", "x" * 120]),
              st.lists(st.text(min_size=1, max_size=12), max_size=8),
              st.sampled_from([".", "!", "?", "", ".\n", "\n\n"])),
    max_size=15).map(lambda parts: " ".join(f"{a} {' '.join(ws)}{end}" for a, ws, end in parts))


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(st.text(max_size=500), sentence_like), budget=st.integers(1, 48), overlap=st.integers(0, 3))
@example(text="토F²", budget=1, overlap=0)  # once an endless loop
def test_chunker_fuzz(tokenizer, text, budget, overlap):
    chunker = Chunker(tokenizer, budget, overlap)
    passages = chunker.chunk_batch([text, text[::-1]])
    for article in passages:
        texts = [t for t, _ in article]
        assert all(t.strip() for t in texts)
        counts = chunker.count_tokens(texts)
        assert counts == [n for _, n in article] and all(n <= budget or len(t) == 1 for t, n in article)
    if "".join(text.split()) and not passages[0]:
        raise AssertionError("text with content produced no passages")


json_lines = st.lists(st.one_of(
    st.fixed_dictionaries({"title": st.text(max_size=20), "text": st.text(max_size=80)}).map(json.dumps),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3)).map(json.dumps),
    st.text(max_size=40)), max_size=6).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))
squad_like = st.fixed_dictionaries({"data": st.lists(st.one_of(
    st.fixed_dictionaries({"title": st.one_of(st.text(max_size=10), st.integers()),
                           "paragraphs": st.lists(st.one_of(st.fixed_dictionaries({"context": st.text(max_size=60)}),
                                                            st.integers(), st.text(max_size=5)), max_size=4)}),
    st.integers(), st.lists(st.none(), max_size=2)), max_size=4)}).map(lambda d: json.dumps(d).encode())
doc_lines = st.lists(st.sampled_from(['<doc id="1" url="u" title="T &amp; U">', "T &amp; U", "", "Some text here.",
                                      "</doc>", "{", '{"title": "A", "text": "B"}']), max_size=10).map(
    lambda ls: "\n".join(ls).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=200), json_lines, squad_like, doc_lines),
       kind=st.sampled_from(["c.jsonl", "s.json", "wikiextractor:wiki_00", "AA/wiki_00", "AA/wiki_00.bz2"]))
def test_source_readers_fuzz(data, kind):
    """Any bytes in any source kind: articles of strings, or a CozyError, nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        rel = kind.split(":")[-1]
        path = Path(tmp) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bz2.compress(data) if rel.endswith(".bz2") else data)
        spec = f"wikiextractor:{path}" if kind.startswith("wikiextractor:") else str(Path(tmp) / rel.split("/")[0]) if "/" in rel else str(path)
        try:
            for title, text in read_articles(resolve_source(spec)):
                assert isinstance(title, str) and isinstance(text, str)
                (title + text).encode("utf-8")  # writable as UTF-8
        except CozyError as e:
            assert "\n" not in str(e)


# ---------------------------------------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, wiki_outputs):
    """Two gloo ranks on CPU write byte-for-byte the passages/passages.jsonl of one process."""
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"title": f"Lighthouse {i}", "text": LONG} for i in range(5)])
    sources = f"--corpus_sources=embedded,{wiki_outputs['doc']},{jsonl}"
    single = run_cli("chunk", "--preset=tiny", f"--out_root={tmp_path / 'one'}", sources)
    assert single.returncode == 0, single.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cozyrag_lib", "chunk", "--preset=tiny", f"--out_root={tmp_path / 'two'}", sources]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = RunPaths(tmp_path / "one" / "tiny"), RunPaths(tmp_path / "two" / "tiny")
    assert one.passages.read_bytes() == two.passages.read_bytes() and len(one.passages.read_bytes().splitlines()) > 200
    summary = json.loads(two.summary(two.passages_dir).read_text())
    assert summary["world_size"] == 2 and summary["articles"] == 200 + 4 + 5
    assert summary == {**json.loads(one.summary(one.passages_dir).read_text()),
                       "world_size": 2, "seconds": summary["seconds"], "path": summary["path"]}
    assert not (two.root / ".passages.parts").exists()
