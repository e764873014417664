"""Splitting a document into chunks of a few hundred tokens that a reply can cite.

A chunk is a contiguous span of its section's text (its character offsets and
lines say where), built from whole blocks (paragraphs, headings, fenced code)
where they fit: a Markdown heading always starts a new chunk, and a block too
long for one chunk is cut at sentence ends, then at spaces. A chunk cut for
length starts with the last sentence or two of the one before (the overlap),
so a fact that straddles the cut is whole in one of them.

Tokens are counted by the embedder's own tokenizer: all-MiniLM-L6-v2 reads 256
tokens of a text and ignores the rest, so a chunk of at most 200 leaves room
for its heading, which is put in front of the text that is embedded.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .readers import Section

CountTokens = Callable[[str], int]

_ATX_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT_UNDERLINE = re.compile(r" {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
# Where a sentence ends: after . ! ? (and closing quotes or brackets) followed by space, or at a line end.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+|\n")


@dataclass(frozen=True)
class ChunkSettings:
    max_tokens: int = 200  # a chunk's text, overlap included
    overlap_tokens: int = 30  # at most this much of the previous chunk is repeated

    @property
    def signature(self) -> str:
        """Recorded with each document: other settings mean its chunks are made again."""
        return f"chunks {self.max_tokens}/{self.overlap_tokens} v1"


@dataclass(frozen=True)
class Chunk:
    text: str
    heading: str | None  # the Markdown headings it is under, "Outer > Inner"
    char_start: int  # offsets into the section's text, end exclusive
    char_end: int
    line_start: int  # 1-based, inclusive; in the page's text for a PDF
    line_end: int
    page: int | None = None

    @property
    def embedding_text(self) -> str:
        """What is embedded: the heading says what a chunk from the middle of a section is about."""
        return f"{self.heading}\n\n{self.text}" if self.heading else self.text


@dataclass
class _Block:
    start: int
    end: int
    heading: str | None  # the heading path in force for (or set by) this block
    is_heading: bool = False
    tokens: int = 0


def chunk_sections(sections: list[Section], kind: str, count_tokens: CountTokens,
                   settings: ChunkSettings = ChunkSettings()) -> list[Chunk]:
    """The chunks of a document's sections, in order. `kind` is markdown, text or pdf."""
    chunks: list[Chunk] = []
    for section in sections:
        blocks = _markdown_blocks(section.text) if kind == "markdown" else _paragraphs(section.text)
        chunks.extend(_pack(section, blocks, count_tokens, settings))
    return chunks


def _line_spans(text: str) -> Iterator[tuple[int, int, str]]:
    start = 0
    for line in text.split("\n"):
        yield start, start + len(line), line
        start += len(line) + 1


def _paragraphs(text: str, heading: str | None = None) -> list[_Block]:
    """Runs of non-blank lines."""
    blocks: list[_Block] = []
    open_start = open_end = None
    for start, end, line in _line_spans(text):
        if line.strip():
            open_start = start if open_start is None else open_start
            open_end = end
        elif open_start is not None:
            blocks.append(_Block(open_start, open_end, heading))
            open_start = None
    if open_start is not None:
        blocks.append(_Block(open_start, open_end, heading))
    return blocks


def _markdown_blocks(text: str) -> list[_Block]:
    """Paragraphs, fenced code blocks and headings (ATX `# Title` and setext `Title` over `===`)."""
    blocks: list[_Block] = []
    path: list[tuple[int, str]] = []  # (level, title) of the headings in force
    para: list[int] = []  # [start, end, line count] of the open paragraph
    fence: str | None = None

    def heading_path() -> str | None:
        return " > ".join(title for _, title in path) or None

    def set_heading(level: int, title: str) -> None:
        while path and path[-1][0] >= level:
            path.pop()
        if title:
            path.append((level, title))

    def close_para() -> None:
        if para:
            blocks.append(_Block(para[0], para[1], heading_path()))
            para.clear()

    for start, end, line in _line_spans(text):
        if fence is not None:
            blocks[-1].end = end
            if line.strip().startswith(fence):
                fence = None
            continue
        fence_match = _FENCE.match(line)
        heading_match = _ATX_HEADING.match(line)
        if fence_match:
            close_para()
            fence = fence_match.group(1)[0] * 3
            blocks.append(_Block(start, end, heading_path()))
        elif heading_match:
            close_para()
            set_heading(len(heading_match.group(1)), (heading_match.group(2) or "").strip())
            blocks.append(_Block(start, end, heading_path(), is_heading=True))
        elif para and para[2] == 1 and _SETEXT_UNDERLINE.match(line):
            title = text[para[0]:para[1]].strip()
            set_heading(1 if line.strip()[0] == "=" else 2, title)
            blocks.append(_Block(para[0], end, heading_path(), is_heading=True))
            para.clear()
        elif not line.strip():
            close_para()
        elif para:
            para[1], para[2] = end, para[2] + 1
        else:
            para.extend([start, end, 1])
    close_para()
    return blocks


def _sentence_starts(text: str, start: int, end: int) -> list[int]:
    """Offsets in (start, end) where a sentence begins."""
    return [m.end() for m in _SENTENCE_END.finditer(text, start, end) if m.end() < end]


def _split_long(text: str, block: _Block, budget: int, count_tokens: CountTokens) -> list[_Block]:
    """A block cut into pieces of at most `budget` tokens: at sentence ends, then at spaces."""
    pieces: list[_Block] = []
    bounds = [block.start, *_sentence_starts(text, block.start, block.end), block.end]
    piece_start = block.start
    piece_tokens = 0
    for left, right in zip(bounds, bounds[1:]):
        tokens = count_tokens(text[left:right])
        if tokens > budget:  # one sentence too long: close what is open, then cut it at spaces
            if piece_start < left:
                pieces.append(_Block(piece_start, left, block.heading, tokens=piece_tokens))
            pieces.extend(_split_at_spaces(text, left, right, tokens, budget, block.heading, count_tokens))
            piece_start, piece_tokens = right, 0
        elif piece_tokens + tokens > budget:
            pieces.append(_Block(piece_start, left, block.heading, tokens=piece_tokens))
            piece_start, piece_tokens = left, tokens
        else:
            piece_tokens += tokens
    if piece_start < block.end:
        pieces.append(_Block(piece_start, block.end, block.heading, tokens=piece_tokens))
    return [_trimmed(text, piece) for piece in pieces if text[piece.start:piece.end].strip()]


def _split_at_spaces(text: str, start: int, end: int, tokens: int, budget: int, heading: str | None,
                     count_tokens: CountTokens) -> list[_Block]:
    """Cut text[start:end] (`tokens` long) at whitespace into pieces of at most `budget` tokens."""
    pieces: list[_Block] = []
    while start < end:
        # As many characters as `budget` tokens take at this text's density, cut back to a space.
        width = max(1, (end - start) * budget // max(tokens, 1))
        while True:
            cut = min(end, start + width)
            if cut < end:
                space = text.rfind(" ", start + 1, cut)
                cut = space if space > start else cut
            piece_tokens = count_tokens(text[start:cut])
            if piece_tokens <= budget or width == 1:
                break
            width = max(1, width * 3 // 4)
        pieces.append(_Block(start, cut, heading, tokens=piece_tokens))
        tokens = max(tokens - piece_tokens, 1)
        start = cut
    return pieces


def _trimmed(text: str, block: _Block) -> _Block:
    span = text[block.start:block.end]
    block.start += len(span) - len(span.lstrip())
    block.end -= len(span) - len(span.rstrip())
    return block


def _pack(section: Section, blocks: list[_Block], count_tokens: CountTokens,
          settings: ChunkSettings) -> list[Chunk]:
    text = section.text
    line_starts = [start for start, _, _ in _line_spans(text)]

    def make(start: int, end: int, heading: str | None) -> Chunk:
        return Chunk(text=text[start:end], heading=heading, char_start=start, char_end=end,
                     line_start=bisect.bisect_right(line_starts, start),
                     line_end=bisect.bisect_right(line_starts, max(start, end - 1)), page=section.page)

    # A long block's pieces leave room for the overlap in front of them.
    piece_budget = max(settings.max_tokens - settings.overlap_tokens, settings.max_tokens // 2, 1)
    pieces: list[_Block] = []
    for block in blocks:
        block.tokens = count_tokens(text[block.start:block.end])
        if block.tokens > settings.max_tokens and not block.is_heading:
            pieces.extend(_split_long(text, block, piece_budget, count_tokens))
        else:
            pieces.append(block)

    chunks: list[Chunk] = []
    start = end = None  # the open chunk
    tokens = 0
    has_body = False  # the open chunk holds more than headings
    heading: str | None = None
    for piece in pieces:
        if piece.is_heading:
            if start is not None and has_body:
                chunks.append(make(start, end, heading))
                start = None
            if start is None:
                start, tokens, has_body = piece.start, 0, False
            end, tokens, heading = piece.end, tokens + piece.tokens, piece.heading
            continue
        if start is not None and tokens + piece.tokens > settings.max_tokens:
            if has_body:
                chunks.append(make(start, end, heading))
                start = _overlap_start(text, start, end, settings.overlap_tokens, count_tokens)
                tokens = count_tokens(text[start:end]) if start is not None else 0
                if start is not None and tokens + piece.tokens > settings.max_tokens:
                    start = None  # the piece alone fills a chunk: no room to repeat anything
            # A heading alone with a full-size piece after it: they go over together, a little.
        if start is None:
            start, tokens = piece.start, 0
        end, tokens, has_body, heading = piece.end, tokens + piece.tokens, True, piece.heading
    if start is not None:  # headings at the very end have nothing to wait for
        chunks.append(make(start, end, heading))
    return chunks


def _overlap_start(text: str, start: int, end: int, budget: int, count_tokens: CountTokens) -> int | None:
    """Where the last sentences of text[start:end] that fit in `budget` tokens begin; None if none fit."""
    if budget <= 0:
        return None
    best = None
    for boundary in reversed(_sentence_starts(text, start, end)):
        if count_tokens(text[boundary:end]) > budget:
            break
        best = boundary
    return best
