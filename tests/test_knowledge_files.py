"""Which files a persona's `knowledge:` entries may name: inside the personas folder, plain files, within limits.

Every refusal is one line that starts with the path as written and says why;
the other entries are still found. No model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chatbot.knowledge.files import KnowledgeFile, KnowledgeLimits, check_entry, find_files, read_bytes
from chatbot.knowledge.readers import read_sections
from chatbot.personas import PersonaError


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    personas = tmp_path / "personas"
    (personas / "kb" / "deep").mkdir(parents=True)
    (personas / "kb" / "a.md").write_text("# A\n\nalpha\n")
    (personas / "kb" / "b.txt").write_text("beta\n")
    (personas / "kb" / "deep" / "c.md").write_text("gamma\n")
    (personas / "kb" / "picture.png").write_bytes(b"\x89PNG")
    (personas / "kb" / ".hidden.md").write_text("secret draft\n")
    (personas / "notes.md").write_text("notes\n")
    (tmp_path / "outside.md").write_text("not the persona's to read\n")
    return personas


def rels(files: list[KnowledgeFile]) -> list[str]:
    return [f.rel for f in files]


def test_a_folder_entry_finds_its_documents_in_order_without_hidden_or_other_files(folder: Path) -> None:
    files, errors = find_files(folder, ["kb", "notes.md", "kb/a.md"])
    assert rels(files) == ["kb/a.md", "kb/b.txt", "kb/deep/c.md", "notes.md"]  # a.md once
    assert [f.kind for f in files] == ["markdown", "text", "markdown", "markdown"]
    assert errors == []


@pytest.mark.parametrize(("entry", "reason"), [
    ("../outside.md", "'..' is not allowed"),
    ("kb/../../outside.md", "'..' is not allowed"),
    ("/etc/passwd", "absolute paths are not allowed"),
    ("C:/Windows/win.ini", "write paths with / and relative to the personas folder"),
    ("kb\\a.md", "write paths with / and relative to the personas folder"),
    ("", "give a file or folder path"),
    ("missing.md", "not found in the personas folder"),
    ("kb/picture.png", "unsupported file type"),
])
def test_entries_that_leave_the_folder_or_name_nothing_are_refused(folder: Path, entry: str, reason: str) -> None:
    files, errors = find_files(folder, [entry, "notes.md"])
    assert rels(files) == ["notes.md"]  # the good entry still counts
    assert len(errors) == 1 and errors[0].startswith(f"knowledge {entry or repr(entry)}: ")
    assert reason in errors[0]
    assert "\n" not in errors[0]


def test_check_entry_raises_persona_error() -> None:
    with pytest.raises(PersonaError, match=r"^knowledge \.\./x\.md: '\.\.' is not allowed"):
        check_entry("../x.md")


def test_symbolic_links_are_refused_wherever_they_are(folder: Path, tmp_path: Path) -> None:
    (folder / "link.md").symlink_to(tmp_path / "outside.md")
    (folder / "linked_dir").symlink_to(folder / "kb", target_is_directory=True)
    (folder / "kb" / "inner_link.md").symlink_to(tmp_path / "outside.md")
    files, errors = find_files(folder, ["link.md", "linked_dir/a.md", "linked_dir", "kb"])
    assert rels(files) == ["kb/a.md", "kb/b.txt", "kb/deep/c.md"]
    assert errors == [
        "knowledge link.md: is a symbolic link; knowledge must be plain files and folders inside the personas folder",
        "knowledge linked_dir: is a symbolic link; knowledge must be plain files and folders inside the personas folder",
        "knowledge linked_dir: is a symbolic link; knowledge must be plain files and folders inside the personas folder",
        "knowledge kb/inner_link.md: is a symbolic link; not followed",
    ]


def test_a_file_swapped_for_a_link_after_listing_is_not_read(folder: Path, tmp_path: Path) -> None:
    [file], _ = find_files(folder, ["notes.md"])
    os.remove(folder / "notes.md")
    (folder / "notes.md").symlink_to(tmp_path / "outside.md")
    with pytest.raises(PersonaError, match=r"^knowledge notes\.md: is a symbolic link"):
        read_bytes(file)


def test_size_limits_per_file_and_per_persona(folder: Path) -> None:
    (folder / "big.md").write_text("x" * 3000)
    files, errors = find_files(folder, ["big.md", "notes.md"], KnowledgeLimits(max_text_bytes=2048))
    assert rels(files) == ["notes.md"]
    assert errors == ["knowledge big.md: file is larger than 2 KiB"]

    # 11 + 5 bytes fit in 20; the next two would pass it.
    files, errors = find_files(folder, ["kb", "notes.md"], KnowledgeLimits(max_persona_bytes=20))
    assert rels(files) == ["kb/a.md", "kb/b.txt"]
    assert errors == [
        "knowledge kb/deep/c.md: the persona's knowledge would pass 20 bytes in all; not indexed",
        "knowledge notes.md: the persona's knowledge would pass 20 bytes in all; not indexed",
    ]


def test_a_file_that_grew_past_its_limit_after_listing_is_refused_on_reading(folder: Path) -> None:
    [file], _ = find_files(folder, ["notes.md"], KnowledgeLimits(max_text_bytes=100))
    (folder / "notes.md").write_text("y" * 500)
    with pytest.raises(PersonaError, match=r"^knowledge notes\.md: file is larger than 100 bytes$"):
        read_bytes(file, KnowledgeLimits(max_text_bytes=100))


def test_file_count_and_depth_limits(folder: Path) -> None:
    files, errors = find_files(folder, ["kb"], KnowledgeLimits(max_files=2))
    assert rels(files) == ["kb/a.md", "kb/b.txt"]
    assert errors == ["knowledge kb/deep/c.md: over the limit of 2 knowledge files per persona; "
                      "it and the files after it are not indexed"]
    files, errors = find_files(folder, ["kb", "notes.md"], KnowledgeLimits(max_files=1))
    assert rels(files) == ["kb/a.md"] and len(errors) == 1  # one line, not one per file left out
    files, errors = find_files(folder, ["kb"], KnowledgeLimits(max_depth=0))
    assert rels(files) == ["kb/a.md", "kb/b.txt"]
    assert errors == ["knowledge kb/deep: nested more than 0 folders deep; not searched"]


def test_text_that_is_not_utf8_is_refused_with_its_path(folder: Path) -> None:
    (folder / "latin1.txt").write_bytes("café".encode("latin-1"))
    [file], _ = find_files(folder, ["latin1.txt"])
    with pytest.raises(PersonaError, match=r"^knowledge latin1\.txt: not UTF-8 text"):
        read_sections(file, read_bytes(file))


def test_a_broken_pdf_is_refused_with_its_path(folder: Path) -> None:
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a PDF")
    [file], _ = find_files(folder, ["broken.pdf"])
    with pytest.raises(PersonaError, match=r"^knowledge broken\.pdf: cannot read the PDF"):
        read_sections(file, read_bytes(file))
