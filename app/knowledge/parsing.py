"""Parsers: a file's bytes as blocks of text, each with the heading path, page or row it is in.

Every parser refuses what it cannot read with an `InvalidInput` naming the content, so a bad
upload is a 400 when it is submitted and a failed document when it is ingested again later.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from html.parser import HTMLParser
from pathlib import PurePosixPath
from typing import Any

import orjson

from app.core.errors import InvalidInput


class ParserKind(StrEnum):
    TEXT = "text"
    MARKDOWN = "markdown"
    HTML = "html"
    JSON = "json"
    CSV = "csv"
    PDF = "pdf"


@dataclass(frozen=True, slots=True)
class Block:
    """A run of a document's text and where it sits: under which headings, on which page (PDF),
    in which row (CSV, the items of a JSON array; counted from 1)."""

    text: str
    headings: tuple[str, ...] = ()
    page: int | None = None
    row: int | None = None


_ALIASES = {
    "txt": ParserKind.TEXT,
    "plain_text": ParserKind.TEXT,
    "plaintext": ParserKind.TEXT,
    "md": ParserKind.MARKDOWN,
    "htm": ParserKind.HTML,
}
_EXTENSIONS = {
    ".txt": ParserKind.TEXT,
    ".text": ParserKind.TEXT,
    ".md": ParserKind.MARKDOWN,
    ".markdown": ParserKind.MARKDOWN,
    ".html": ParserKind.HTML,
    ".htm": ParserKind.HTML,
    ".json": ParserKind.JSON,
    ".csv": ParserKind.CSV,
    ".pdf": ParserKind.PDF,
}
_CONTENT_TYPES = {
    "text/plain": ParserKind.TEXT,
    "text/markdown": ParserKind.MARKDOWN,
    "text/x-markdown": ParserKind.MARKDOWN,
    "text/html": ParserKind.HTML,
    "application/xhtml+xml": ParserKind.HTML,
    "application/json": ParserKind.JSON,
    "text/csv": ParserKind.CSV,
    "application/pdf": ParserKind.PDF,
}


def parser_named(name: str) -> ParserKind:
    """The parser called `name` (or one of its aliases); a 400 naming `parser` otherwise."""
    wanted = name.strip().lower()
    if wanted in _ALIASES:
        return _ALIASES[wanted]
    try:
        return ParserKind(wanted)
    except ValueError:
        known = ", ".join(k.value for k in ParserKind)
        raise InvalidInput(f"unknown parser '{name}'; known: {known}", param="parser") from None


def detect_parser(parser: str | None, filename: str | None, content_type: str | None) -> ParserKind:
    """The parser asked for, else the one the content type names, else the file extension's,
    else plain text."""
    if parser:
        return parser_named(parser)
    if content_type:
        found = _CONTENT_TYPES.get(content_type.split(";")[0].strip().lower())
        if found is not None:
            return found
    if filename:
        found = _EXTENSIONS.get(PurePosixPath(filename).suffix.lower())
        if found is not None:
            return found
    return ParserKind.TEXT


def parse(kind: ParserKind, content: bytes) -> list[Block]:
    """The blocks of `content` read as `kind`; empty blocks are left out."""
    if kind is ParserKind.PDF:
        blocks = _pdf(content)
    else:
        text = decode(content)
        blocks = {
            ParserKind.TEXT: _text,
            ParserKind.MARKDOWN: _markdown,
            ParserKind.HTML: _html,
            ParserKind.JSON: _json,
            ParserKind.CSV: _csv,
        }[kind](text)
    return [replace(b, text=b.text.strip()) for b in blocks if b.text.strip()]


def decode(content: bytes) -> str:
    """UTF-8 text (a byte-order mark dropped, line ends made `\\n`)."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"the content is not UTF-8 text (byte {exc.start} cannot be read)", param="content"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


def _text(text: str) -> list[Block]:
    return [Block(text)]


# ---- Markdown --------------------------------------------------------------------------------

_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _markdown(text: str) -> list[Block]:
    """A block per section: a heading and what follows it up to the next heading; the heading
    path is every enclosing heading's text. Headings inside fenced code are not headings."""
    lines = text.split("\n")
    blocks: list[Block] = []
    path: list[tuple[int, str]] = []
    current: list[str] = []
    fence: str | None = None

    def close() -> None:
        if current:
            blocks.append(Block("\n".join(current), tuple(title for _, title in path)))
            current.clear()

    def open_section(level: int, title: str, heading_lines: list[str]) -> None:
        close()
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title))
        current.extend(heading_lines)

    index = 0
    while index < len(lines):
        line = lines[index]
        fenced = _FENCE.match(line)
        if fence is not None:
            if fenced and fenced.group(1)[0] == fence[0] and len(fenced.group(1)) >= len(fence):
                fence = None
            current.append(line)
        elif fenced:
            fence = fenced.group(1)
            current.append(line)
        elif (atx := _ATX.match(line)) is not None:
            open_section(len(atx.group(1)), (atx.group(2) or "").strip(), [line])
        elif (
            index + 1 < len(lines)
            and line.strip()
            and not line.startswith((" " * 4, "\t"))
            and (setext := _SETEXT.match(lines[index + 1])) is not None
            # A `---` under a list item or after a blank line is a rule, not a heading.
            and not re.match(r"^\s*([-*+]|\d+[.)])\s", line)
        ):
            level = 1 if setext.group(1)[0] == "=" else 2
            open_section(level, line.strip(), [line, lines[index + 1]])
            index += 1
        else:
            current.append(line)
        index += 1
    close()
    return blocks


# ---- HTML ------------------------------------------------------------------------------------

_SKIPPED = frozenset({"script", "style", "noscript", "template", "head", "svg", "iframe", "object"})
_BREAKS = frozenset(
    {
        "p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header",
        "footer", "nav", "aside", "main", "blockquote", "pre", "hr", "dl", "dt", "dd",
        "figure", "figcaption", "form", "fieldset", "address", "details", "summary",
    }
)  # fmt: skip
_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_SPACES = re.compile(r"[ \t\f\v]+")


class _HtmlText(HTMLParser):
    """Collects an HTML page's visible text as sections under their headings."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self._path: list[tuple[int, str]] = []
        self._parts: list[str] = []
        self._skipping: list[str] = []
        self._heading: tuple[int, list[str]] | None = None
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skipping:
            if tag == self._skipping[-1]:
                self._skipping.append(tag)
            return
        if tag in _SKIPPED:
            self._skipping.append(tag)
        elif tag in _HEADINGS:
            self._close()
            self._heading = (_HEADINGS[tag], [])
        elif tag in _BREAKS:
            self._parts.append("\n\n" if tag in ("p", "div", "section", "article") else "\n")
            if tag == "pre":
                self._pre += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self._skipping and tag in ("br", "hr"):
            self._parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self._skipping:
            if tag == self._skipping[-1]:
                self._skipping.pop()
            return
        if tag in _HEADINGS and self._heading is not None:
            level, words = self._heading
            title = _SPACES.sub(" ", "".join(words)).strip()
            self._heading = None
            while self._path and self._path[-1][0] >= level:
                self._path.pop()
            self._path.append((level, title))
            self._parts.append(title + "\n\n")
        elif tag in _BREAKS:
            self._parts.append("\n")
            if tag == "pre":
                self._pre = max(0, self._pre - 1)

    def handle_data(self, data: str) -> None:
        if self._skipping:
            return
        if self._heading is not None:
            self._heading[1].append(data)
        elif self._pre:
            self._parts.append(data)
        else:
            self._parts.append(_SPACES.sub(" ", data.replace("\n", " ")))

    def _close(self) -> None:
        text = "".join(self._parts)
        lines = [line.strip() if not self._pre else line for line in text.split("\n")]
        cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if cleaned:
            self.blocks.append(Block(cleaned, tuple(title for _, title in self._path)))
        self._parts = []

    def finish(self) -> list[Block]:
        self.close()
        self._close()
        return self.blocks


def _html(text: str) -> list[Block]:
    """Visible text only (scripts, styles and the head dropped), a block per heading section."""
    parser = _HtmlText()
    parser.feed(text)
    return parser.finish()


# ---- JSON and CSV ----------------------------------------------------------------------------


def _flatten(value: Any, path: str = "") -> Iterator[str]:
    """`path: value` lines, one per scalar, paths joined by dots."""
    if isinstance(value, dict):
        if not value and path:
            yield f"{path}: {{}}"
        for key, item in value.items():
            yield from _flatten(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        if not value and path:
            yield f"{path}: []"
        for index, item in enumerate(value):
            yield from _flatten(item, f"{path}.{index}" if path else str(index))
    else:
        shown = value if isinstance(value, str) else orjson.dumps(value).decode()
        yield f"{path}: {shown}" if path else str(shown)


def _json(text: str) -> list[Block]:
    """An array: a block per item (its row); an object: a block per top-level key (its
    heading); each as `path: value` lines."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the content is not valid JSON: {exc}", param="content") from None
    if isinstance(value, list):
        return [Block("\n".join(_flatten(item)), row=i + 1) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return [
            Block("\n".join(_flatten(item, str(key))), headings=(str(key),))
            for key, item in value.items()
        ]
    return [Block("\n".join(_flatten(value)))]


def _csv(text: str) -> list[Block]:
    """A block per data row (its row number), as `column: value` lines under the header's
    names."""
    sample = text[:8192]
    try:
        dialect: Any = csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    try:
        rows = list(csv.reader(io.StringIO(text), dialect))
    except csv.Error as exc:
        raise InvalidInput(f"the content is not valid CSV: {exc}", param="content") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        return []
    header = [name.strip() or f"column_{i + 1}" for i, name in enumerate(rows[0])]
    blocks = []
    for number, row in enumerate(rows[1:], start=1):
        names = header + [f"column_{i + 1}" for i in range(len(header), len(row))]
        lines = [f"{name}: {cell.strip()}" for name, cell in zip(names, row, strict=False)]
        blocks.append(Block("\n".join(lines), row=number))
    return blocks


# ---- PDF -------------------------------------------------------------------------------------


def _pdf(content: bytes) -> list[Block]:
    """The text of each page (its page number); a scanned page without text yields nothing."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(content))
        if reader.is_encrypted:
            raise InvalidInput("the PDF is encrypted", param="content")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidInput(
            f"the content is not a readable PDF ({type(exc).__name__})", param="content"
        ) from None
    return [
        Block(decode(text.encode("utf-8", "replace")), page=number)
        for number, text in enumerate(pages, start=1)
    ]
