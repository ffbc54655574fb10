"""Parsers and chunkers: what each keeps of a document, and where each chunk sits in it."""

from __future__ import annotations

import itertools

import pytest

from app.core.errors import InvalidInput
from app.knowledge.chunking import Chunking, ChunkStrategy, chunk
from app.knowledge.parsing import Block, ParserKind, detect_parser, parse
from tests.knowledge.pdf import pdf_of

MARKDOWN = b"""Preface.

# Guide

Read this first.

## Install

```sh
# a comment in code, not a heading
pip install it
```

Then run it.

Usage
-----

Call it.
"""


def test_markdown_sections_carry_their_heading_path_and_ignore_code_fences() -> None:
    blocks = parse(ParserKind.MARKDOWN, MARKDOWN)

    assert [b.headings for b in blocks] == [
        (),
        ("Guide",),
        ("Guide", "Install"),
        ("Guide", "Usage"),
    ]
    assert "# a comment in code" in blocks[2].text
    assert blocks[3].text.endswith("Call it.")


def test_html_keeps_visible_text_under_its_headings_and_drops_scripts_and_styles() -> None:
    page = b"""<html><head><title>T</title><style>p { color: red }</style></head>
    <body><h1>Top</h1><p>Hello <b>world</b> &amp; more</p>
    <script>steal()</script><noscript>no</noscript>
    <h2>Part</h2><p>Inside</p></body></html>"""

    blocks = parse(ParserKind.HTML, page)

    assert [b.headings for b in blocks] == [("Top",), ("Top", "Part")]
    assert "Hello world & more" in blocks[0].text
    text = " ".join(b.text for b in blocks)
    assert "steal" not in text and "color" not in text and "no" not in text.split()


def test_csv_rows_become_blocks_of_column_value_lines() -> None:
    blocks = parse(ParserKind.CSV, b"name,city\nAda,London\n\nAlan,Wilmslow\n")

    assert [(b.row, b.text) for b in blocks] == [
        (1, "name: Ada\ncity: London"),
        (2, "name: Alan\ncity: Wilmslow"),
    ]


def test_json_arrays_give_a_block_per_item_and_objects_one_per_key() -> None:
    items = parse(ParserKind.JSON, b'[{"a": 1, "b": {"c": "x"}}, {"a": 2}]')
    keys = parse(ParserKind.JSON, b'{"intro": "hi", "list": [1, 2]}')

    assert [(b.row, b.text) for b in items] == [(1, "a: 1\nb.c: x"), (2, "a: 2")]
    assert [(b.headings, b.text) for b in keys] == [
        (("intro",), "intro: hi"),
        (("list",), "list.0: 1\nlist.1: 2"),
    ]


def test_pdf_pages_keep_their_numbers() -> None:
    blocks = parse(ParserKind.PDF, pdf_of(["First page", "", "Third (last) page"]))

    assert [(b.page, b.text) for b in blocks] == [(1, "First page"), (3, "Third (last) page")]


@pytest.mark.parametrize(
    ("kind", "content", "says"),
    [
        (ParserKind.TEXT, b"\xff\xfe\xfa", "not UTF-8"),
        (ParserKind.JSON, b"{nope", "not valid JSON"),
        (ParserKind.PDF, b"%PDF-1.4 garbage", "not a readable PDF"),
    ],
)
def test_unreadable_content_is_refused_naming_the_content(
    kind: ParserKind, content: bytes, says: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse(kind, content)

    assert refused.value.param == "content" and says in refused.value.message


def test_the_parser_is_the_one_asked_for_else_the_content_type_else_the_extension() -> None:
    assert detect_parser("md", "x.html", "text/csv") is ParserKind.MARKDOWN
    assert detect_parser(None, "x.html", "text/csv; charset=utf-8") is ParserKind.CSV
    assert detect_parser(None, "Report.PDF", "application/octet-stream") is ParserKind.PDF
    assert detect_parser(None, None, None) is ParserKind.TEXT
    with pytest.raises(InvalidInput) as refused:
        detect_parser("docx", None, None)
    assert refused.value.param == "parser"


def _words(count: int) -> str:
    return " ".join(f"w{i}" for i in range(count))


def test_fixed_size_windows_overlap_and_cover_the_whole_text() -> None:
    text = _words(2000)
    pieces = chunk([Block(text)], Chunking(ChunkStrategy.FIXED_SIZE, 1000, 200))

    assert all(len(p.text) <= 1000 for p in pieces)
    assert pieces[0].start == 0 and pieces[-1].end == len(text)
    for before, after in itertools.pairwise(pieces):
        assert after.start < before.end  # they overlap
        assert before.end - after.start <= 200
        assert text[after.start - 1] == " "  # and start at a word
    assert [p.index for p in pieces] == list(range(len(pieces)))
    assert all(text[p.start : p.end] == p.text for p in pieces)


def test_sentence_chunks_end_at_sentence_ends() -> None:
    sentences = [f"Sentence number {i} says something." for i in range(60)]
    text = " ".join(sentences)
    pieces = chunk([Block(text)], Chunking(ChunkStrategy.SENTENCE, 200, 50))

    assert len(pieces) > 5
    assert all(p.text.endswith(".") and len(p.text) <= 200 for p in pieces)
    assert all(p.text.startswith("Sentence number") for p in pieces)


def test_paragraph_chunks_keep_paragraphs_whole_when_they_fit() -> None:
    paragraphs = [f"Paragraph {i}. " + _words(20) for i in range(10)]
    pieces = chunk([Block("\n\n".join(paragraphs))], Chunking(ChunkStrategy.PARAGRAPH, 300, 0))

    joined = [p.text for p in pieces]
    for paragraph in paragraphs:
        assert any(paragraph in piece for piece in joined)


def test_recursive_chunks_fall_back_to_smaller_separators_for_long_runs() -> None:
    text = "Short intro.\n\n" + _words(400)  # one long paragraph without sentence ends
    pieces = chunk([Block(text)], Chunking(ChunkStrategy.RECURSIVE, 300, 0))

    assert all(len(p.text) <= 300 for p in pieces)
    assert " ".join(p.text for p in pieces).split() == text.split()


def test_section_chunks_follow_the_blocks_and_carry_heading_page_and_row() -> None:
    blocks = parse(ParserKind.MARKDOWN, MARKDOWN)
    pieces = chunk(blocks, Chunking(ChunkStrategy.SECTION, 1000, 200))

    assert [p.headings for p in pieces] == [b.headings for b in blocks]
    rows = chunk(parse(ParserKind.CSV, b"a\n1\n2\n3\n"), Chunking(ChunkStrategy.SECTION))
    assert [(p.row, p.text) for p in rows] == [(1, "a: 1"), (2, "a: 2"), (3, "a: 3")]
    pages = chunk(parse(ParserKind.PDF, pdf_of(["one", "two"])), Chunking(ChunkStrategy.SECTION))
    assert [p.page for p in pages] == [1, 2]


@pytest.mark.parametrize("strategy", list(ChunkStrategy))
def test_every_strategy_keeps_every_word_in_order(strategy: ChunkStrategy) -> None:
    blocks = parse(ParserKind.MARKDOWN, MARKDOWN * 20)
    pieces = chunk(blocks, Chunking(strategy, 120, 0))

    words = [w for b in blocks for w in b.text.split()]
    assert [w for p in pieces for w in p.text.split()] == words
    assert all(len(p.text) <= 120 for p in pieces)
