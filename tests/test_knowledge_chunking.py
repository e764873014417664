"""Chunking knowledge documents: where chunks start and end, what they say they are under, what they cover.

Tokens are counted here as words (the index counts them with the embedding
model's tokenizer); no model is loaded.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from chatbot.knowledge.chunking import ChunkSettings, chunk_sections
from chatbot.knowledge.readers import Section


def words(text: str) -> int:
    return len(text.split())


def sentences(prefix: str, count: int) -> str:
    return " ".join(f"{prefix} sentence number {i} ends here." for i in range(count))


def test_each_heading_starts_a_chunk_that_knows_its_heading_path() -> None:
    text = ("Intro before any heading.\n\n# Shop policies\n\n## Refunds\n\nReturn within 30 days.\n\n"
            "## Shipping\nWe ship worldwide.\n")
    chunks = chunk_sections([Section(text)], "markdown", words)
    assert [(c.heading, c.text) for c in chunks] == [
        (None, "Intro before any heading."),
        # A heading with nothing under it before the next one stays with the next: no heading-only chunk.
        ("Shop policies > Refunds", "# Shop policies\n\n## Refunds\n\nReturn within 30 days."),
        ("Shop policies > Shipping", "## Shipping\nWe ship worldwide."),
    ]
    assert chunks[1].embedding_text.startswith("Shop policies > Refunds\n\n# Shop policies")


def test_offsets_and_lines_point_at_the_chunk_in_the_file() -> None:
    text = "# A\n\nfirst para\nstill first\n\n# B\n\nsecond para\n"
    chunks = chunk_sections([Section(text)], "markdown", words)
    for chunk in chunks:
        assert text[chunk.char_start:chunk.char_end] == chunk.text
    assert [(c.line_start, c.line_end) for c in chunks] == [(1, 4), (6, 8)]


def test_a_long_section_is_cut_at_sentence_ends_with_an_overlap_within_the_budget() -> None:
    text = "# Refunds\n\n" + sentences("Refund", 40)
    settings_ = ChunkSettings(max_tokens=60, overlap_tokens=14)
    chunks = chunk_sections([Section(text)], "markdown", words, settings_)
    assert len(chunks) > 3
    for chunk in chunks:
        assert words(chunk.text) <= settings_.max_tokens
        assert chunk.heading == "Refunds"
        assert chunk.text.rstrip().endswith(".")  # cut at a sentence end
    for before, after in zip(chunks, chunks[1:]):
        overlap = before.char_end - after.char_start
        assert overlap > 0, "a chunk cut for length repeats the end of the one before"
        assert words(text[after.char_start:before.char_end]) <= settings_.overlap_tokens


def test_a_sentence_longer_than_a_chunk_is_cut_at_spaces() -> None:
    text = " ".join(f"w{i}" for i in range(500))
    chunks = chunk_sections([Section(text)], "text", words, ChunkSettings(max_tokens=50, overlap_tokens=0))
    assert all(words(c.text) <= 50 for c in chunks)
    assert " ".join(c.text for c in chunks).split() == text.split()


def test_hashes_inside_a_code_fence_are_not_headings() -> None:
    text = "# Setup\n\n```sh\n# install it\npip install x\n```\n\nDone.\n"
    chunks = chunk_sections([Section(text)], "markdown", words)
    assert [c.heading for c in chunks] == ["Setup"]
    assert "# install it" in chunks[0].text


def test_setext_headings_and_plain_text_without_headings() -> None:
    text = "Refunds\n=======\n\nThirty days.\n\nDetails\n-------\nKeep the receipt.\n"
    assert [c.heading for c in chunk_sections([Section(text)], "markdown", words)] == [
        "Refunds", "Refunds > Details"]
    # A .txt file has no headings: '#' lines are text.
    plain = chunk_sections([Section("# not a heading\n\nplain text\n")], "text", words)
    assert [c.heading for c in plain] == [None]


def test_pdf_pages_are_chunked_apart_and_keep_their_page_number() -> None:
    chunks = chunk_sections([Section("page one text", page=1), Section("page two text", page=2)], "pdf", words)
    assert [(c.page, c.text, c.line_start) for c in chunks] == [(1, "page one text", 1), (2, "page two text", 1)]


def test_blank_document_gives_no_chunks() -> None:
    assert chunk_sections([Section("\n\n   \n")], "markdown", words) == []


_LINE = st.one_of(
    st.just(""),
    st.builds(lambda level, title: "#" * level + " " + title, st.integers(1, 3),
              st.text("abc ", min_size=1, max_size=12)),
    st.lists(st.sampled_from(["alpha", "beta.", "gamma!", "delta?", "x", "```"]), min_size=1, max_size=40)
    .map(" ".join),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_LINE, max_size=60), st.integers(8, 40), st.integers(0, 6))
def test_chunks_cover_every_word_in_order_and_stay_in_budget(lines, max_tokens, overlap) -> None:
    text = "\n".join(lines)
    settings_ = ChunkSettings(max_tokens=max_tokens, overlap_tokens=overlap)
    chunks = chunk_sections([Section(text)], "markdown", words, settings_)
    covered = []
    position = 0
    for chunk in chunks:
        assert text[chunk.char_start:chunk.char_end] == chunk.text
        assert chunk.char_start < chunk.char_end
        # Over budget only by heading lines that open the chunk (they go with what follows).
        heading_words = sum(words(line) for line in chunk.text.split("\n") if re.match(r" {0,3}#{1,6}( |$)", line))
        assert words(chunk.text) <= max_tokens + heading_words
        covered.append((max(chunk.char_start, position), chunk.char_end))
        position = max(position, chunk.char_end)
    # Every non-blank character is in some chunk.
    inside = [False] * len(text)
    for start, end in covered:
        for i in range(start, end):
            inside[i] = True
    assert all(inside[i] for i, ch in enumerate(text) if not ch.isspace())
