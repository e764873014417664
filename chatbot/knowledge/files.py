"""Which files a persona's `knowledge:` entries name, checked before anything is read.

The entries come from persona files that users may edit, so each must stay
inside the personas folder: a relative path without `..`, and no symbolic link
anywhere on the way (a linked folder inside the personas folder could lead
anywhere). Folders are searched for Markdown, text and PDF files, never
through links. Sizes are limited per file and per persona.

A bad entry or file does not stop the others: `find_files` returns the good
files and one line per problem, each a `PersonaError` message that starts with
the path as written.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from chatbot.personas import PersonaError, open_plain_file

# File kinds by suffix (lower case); other files in a listed folder are passed over.
KINDS = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".pdf": "pdf"}


@dataclass(frozen=True)
class KnowledgeLimits:
    """How much one persona may bring; past these a file is refused (and reported), the rest indexed."""

    max_text_bytes: int = 2 * 1024 * 1024  # a Markdown or text file: a long manual
    max_pdf_bytes: int = 16 * 1024 * 1024
    max_pdf_pages: int = 500
    max_persona_bytes: int = 64 * 1024 * 1024  # all files of one persona together
    max_files: int = 500
    max_chunks: int = 20_000  # what one persona may have in the index: 10,000 chunks search in ~20 ms
    max_depth: int = 8  # folders inside a listed folder

    def max_bytes(self, kind: str) -> int:
        return self.max_pdf_bytes if kind == "pdf" else self.max_text_bytes


@dataclass(frozen=True)
class KnowledgeFile:
    rel: str  # relative to the personas folder, with `/`: what the index and a citation show
    path: Path
    kind: str  # markdown, text or pdf
    size: int


def _size(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


def _error(rel: str, reason: str) -> PersonaError:
    return PersonaError(f"knowledge {rel}: {reason}")


def check_entry(entry: object) -> PurePosixPath:
    """An entry as written: a relative path with `/`, no `..`; PersonaError otherwise."""
    if not isinstance(entry, str) or not entry.strip():
        raise _error(repr(entry), "give a file or folder path inside the personas folder")
    if "\0" in entry:
        raise _error(repr(entry), "the path has a NUL character")
    if "\\" in entry or PureWindowsPath(entry).drive:
        raise _error(entry, "write paths with / and relative to the personas folder")
    path = PurePosixPath(entry)
    if path.is_absolute():
        raise _error(entry, "absolute paths are not allowed; give a path inside the personas folder")
    if ".." in path.parts:
        raise _error(entry, "'..' is not allowed; knowledge files must be inside the personas folder")
    return path


def _lstat(path: Path, rel: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise _error(rel, "not found in the personas folder") from None
    except OSError as exc:
        raise _error(rel, f"cannot read: {exc.strerror or exc}") from None


def _walk_to(folder: Path, entry: PurePosixPath) -> tuple[Path, os.stat_result]:
    """Follow `entry` from `folder` one name at a time, refusing a link at every step."""
    path, rel = folder, ""
    info = _lstat(folder, ".")
    for part in entry.parts:
        if part == ".":
            continue
        path, rel = path / part, f"{rel}/{part}" if rel else part
        info = _lstat(path, rel)
        if stat.S_ISLNK(info.st_mode):
            raise _error(rel, "is a symbolic link; knowledge must be plain files and folders "
                              "inside the personas folder")
    return path, info


def find_files(folder: Path, entries: list[str], limits: KnowledgeLimits = KnowledgeLimits()
               ) -> tuple[list[KnowledgeFile], list[str]]:
    """The files that `entries` name (folders searched), in order, each once; and the problems found."""
    folder = Path(folder)
    found: dict[str, KnowledgeFile] = {}
    errors: list[str] = []
    total = 0
    over: list[str] = []  # the first file past max_files

    def add(path: Path, rel: str, info: os.stat_result, listed: bool) -> None:
        nonlocal total
        kind = KINDS.get(Path(rel).suffix.lower())
        if kind is None:
            if listed:  # a file in a folder may be anything; one named on its own must be readable
                errors.append(str(_error(rel, f"unsupported file type; use {', '.join(sorted(KINDS))}")))
            return
        if rel in found:
            return
        if len(found) >= limits.max_files:
            if not over:  # said once, not for each of a big folder's files
                errors.append(str(_error(rel, f"over the limit of {limits.max_files} knowledge files "
                                              "per persona; it and the files after it are not indexed")))
                over.append(rel)
            return
        if info.st_size > limits.max_bytes(kind):
            errors.append(str(_error(rel, f"file is larger than {_size(limits.max_bytes(kind))}")))
            return
        if total + info.st_size > limits.max_persona_bytes:
            errors.append(str(_error(rel, f"the persona's knowledge would pass "
                                          f"{_size(limits.max_persona_bytes)} in all; not indexed")))
            return
        total += info.st_size
        found[rel] = KnowledgeFile(rel=rel, path=path, kind=kind, size=info.st_size)

    def walk(path: Path, rel: str, depth: int) -> None:
        """Add the folder's files; `rel` is the folder relative to the personas folder ("" for itself)."""
        try:
            with os.scandir(path) as listing:
                names = sorted(item.name for item in listing)
        except OSError as exc:
            errors.append(str(_error(rel or ".", f"cannot list the folder: {exc.strerror or exc}")))
            return
        for name in names:
            if name.startswith("."):  # editor swap files, .git and the like
                continue
            child, child_rel = path / name, f"{rel}/{name}" if rel else name
            try:
                info = _lstat(child, child_rel)
            except PersonaError as exc:
                errors.append(str(exc))
                continue
            if stat.S_ISLNK(info.st_mode):
                errors.append(str(_error(child_rel, "is a symbolic link; not followed")))
            elif stat.S_ISDIR(info.st_mode):
                if depth >= limits.max_depth:
                    errors.append(str(_error(child_rel, f"nested more than {limits.max_depth} "
                                                        "folders deep; not searched")))
                else:
                    walk(child, child_rel, depth + 1)
            elif stat.S_ISREG(info.st_mode):
                add(child, child_rel, info, listed=False)

    for entry in entries:
        try:
            parts = check_entry(entry)
            path, info = _walk_to(folder, parts)
        except PersonaError as exc:
            errors.append(str(exc))
            continue
        rel = parts.as_posix()
        if stat.S_ISDIR(info.st_mode):
            walk(path, "" if rel == "." else rel, 0)
        elif stat.S_ISREG(info.st_mode):
            add(path, rel, info, listed=True)
        else:
            errors.append(str(_error(rel, "is not a plain file or folder")))
    return list(found.values()), errors


def read_bytes(file: KnowledgeFile, limits: KnowledgeLimits = KnowledgeLimits()) -> bytes:
    """The file's content, opened without following a link; PersonaError if it grew past its limit."""
    limit = limits.max_bytes(file.kind)
    try:
        with open_plain_file(file.path) as handle:
            data = handle.read(limit + 1)
    except PersonaError as exc:
        # open_plain_file names the absolute path; the persona's author knows the relative one.
        reason = str(exc).removeprefix(f"{file.path}: ")
        raise _error(file.rel, reason) from None
    if len(data) > limit:
        raise _error(file.rel, f"file is larger than {_size(limit)}")
    return data
