"""Chunkers: a parsed document's blocks cut into the pieces that are embedded and searched.

The blocks are joined (by a blank line) into one text, and every strategy cuts spans of it; a
piece keeps its span (`start`, `end`), and the heading path, page and row of the block it starts
in. Sizes are in characters.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from app.knowledge.parsing import Block

DEFAULT_SIZE = 1000
DEFAULT_OVERLAP = 200
MAX_SIZE = 100_000
SEPARATOR = "\n\n"


class ChunkStrategy(StrEnum):
    FIXED_SIZE = "fixed_size"  # windows of `size` with `overlap`, ended at a space when near
    SENTENCE = "sentence"  # whole sentences packed up to `size`
    PARAGRAPH = "paragraph"  # whole paragraphs packed up to `size` (long ones by sentence)
    RECURSIVE = "recursive"  # paragraphs, then lines, sentences, words: the largest that fit
    SECTION = "section"  # a chunk per block: Markdown/HTML section, CSV row, JSON item, PDF page


@dataclass(frozen=True, slots=True)
class Chunking:
    """How a document is cut; `overlap` must be smaller than `size`."""

    strategy: ChunkStrategy = ChunkStrategy.FIXED_SIZE
    size: int = DEFAULT_SIZE
    overlap: int = DEFAULT_OVERLAP


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk's text, its span in the joined text, and where it is in the document."""

    index: int
    text: str
    start: int
    end: int
    headings: tuple[str, ...] = ()
    page: int | None = None
    row: int | None = None


Span = tuple[int, int]

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_LINE = re.compile(r"\n")
_SENTENCE = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n[ \t]*\n\s*")
_WORD = re.compile(r"\s+")

_LEVELS: dict[ChunkStrategy, tuple[re.Pattern[str], ...]] = {
    ChunkStrategy.SENTENCE: (_SENTENCE,),
    ChunkStrategy.PARAGRAPH: (_PARAGRAPH, _SENTENCE),
    ChunkStrategy.RECURSIVE: (_PARAGRAPH, _LINE, _SENTENCE, _WORD),
    ChunkStrategy.SECTION: (_PARAGRAPH, _LINE, _SENTENCE, _WORD),
}


def chunk(blocks: Sequence[Block], chunking: Chunking) -> list[Piece]:
    """The pieces of `blocks` as `chunking` cuts them, in order, blank ones left out."""
    text = SEPARATOR.join(b.text for b in blocks)
    starts: list[int] = []
    offset = 0
    for block in blocks:
        starts.append(offset)
        offset += len(block.text) + len(SEPARATOR)
    size, overlap = chunking.size, chunking.overlap
    if chunking.strategy is ChunkStrategy.FIXED_SIZE:
        spans = _windows(text, 0, len(text), size, overlap)
    elif chunking.strategy is ChunkStrategy.SECTION:
        spans = []
        for block, start in zip(blocks, starts, strict=True):
            end = start + len(block.text)
            if end - start <= size:
                spans.append((start, end))
            else:
                units = _units(text, start, end, _LEVELS[chunking.strategy], size)
                spans += _pack(units, size, overlap)
    else:
        levels = _LEVELS[chunking.strategy]
        spans = _pack(_units(text, 0, len(text), levels, size), size, overlap)
    pieces: list[Piece] = []
    for start, end in spans:
        start, end = _trimmed(text, start, end)
        if start >= end:
            continue
        block = blocks[bisect.bisect_right(starts, start) - 1]
        pieces.append(
            Piece(
                index=len(pieces),
                text=text[start:end],
                start=start,
                end=end,
                headings=block.headings,
                page=block.page,
                row=block.row,
            )
        )
    return pieces


def _trimmed(text: str, start: int, end: int) -> Span:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _windows(text: str, start: int, end: int, size: int, overlap: int) -> list[Span]:
    """Windows of `size` over `text[start:end]`, each `overlap` into the one before; a window
    ends at a space when there is one in its last fifth, so words are rarely cut."""
    spans: list[Span] = []
    position = start
    while position < end:
        stop = min(position + size, end)
        if stop < end:
            space = _last_space(text, position + size * 4 // 5, stop)
            if space > position:
                stop = space
        spans.append((position, stop))
        if stop >= end:
            break
        following = max(stop - overlap, position + 1)
        # An overlap that would begin inside a word begins after it (if that is near).
        if 0 < following < stop and not text[following - 1].isspace():
            space = _next_space(text, following, min(stop, following + overlap // 2))
            if space != -1:
                following = space
        position = following
    return spans


def _next_space(text: str, low: int, high: int) -> int:
    for index in range(low, high):
        if text[index].isspace():
            return index + 1
    return -1


def _last_space(text: str, low: int, high: int) -> int:
    for index in range(high - 1, low - 1, -1):
        if text[index].isspace():
            return index + 1
    return -1


def _units(
    text: str, start: int, end: int, levels: Sequence[re.Pattern[str]], size: int
) -> list[Span]:
    """`text[start:end]` cut at the first level's separators (each kept with the unit before
    it), a unit still longer than `size` cut at the next level's, down to fixed windows."""
    if end - start <= size:
        return [(start, end)]
    if not levels:
        return _windows(text, start, end, size, 0)
    pattern, rest = levels[0], levels[1:]
    units: list[Span] = []
    position = start
    for match in pattern.finditer(text, start, end):
        if match.end() <= position or match.end() >= end:
            continue
        units.append((position, match.end()))
        position = match.end()
    units.append((position, end))
    if len(units) == 1:
        return _units(text, start, end, rest, size)
    found: list[Span] = []
    for unit_start, unit_end in units:
        found += _units(text, unit_start, unit_end, rest, size)
    return found


def _pack(units: Sequence[Span], size: int, overlap: int) -> list[Span]:
    """Consecutive units joined while the span stays within `size` (each unit fits it); every
    span after the first starts with the trailing units of the one before that fit in
    `overlap` (and leave room for the next unit, so each span reaches further)."""
    spans: list[Span] = []
    first = 0
    while first < len(units):
        last = first
        while last + 1 < len(units) and units[last + 1][1] - units[first][0] <= size:
            last += 1
        spans.append((units[first][0], units[last][1]))
        if last + 1 >= len(units):
            break
        following = last + 1
        carried = following
        while (
            carried - 1 > first
            and units[last][1] - units[carried - 1][0] <= overlap
            and units[following][1] - units[carried - 1][0] <= size
        ):
            carried -= 1
        first = carried
    return spans
