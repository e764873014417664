"""A knowledge file's text: Markdown and text decoded as UTF-8, PDF pages through pypdf.

pypdf is pure Python (one 420 KB wheel, no dependencies on Python 3.11+), so
PDF support costs nothing to install. A PDF gives one section per page, and a
chunk never spans two pages: its page number is then an exact citation.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from chatbot.personas import PersonaError

from .files import KnowledgeFile, KnowledgeLimits


@dataclass(frozen=True)
class Section:
    """Text that is chunked on its own: a whole text file, or one page of a PDF."""

    text: str  # line ends are \n; a chunk's character offsets count in this text
    page: int | None = None  # 1-based, for a PDF


def read_sections(file: KnowledgeFile, data: bytes, limits: KnowledgeLimits = KnowledgeLimits()
                  ) -> list[Section]:
    """The sections of `file` (whose content is `data`); PersonaError naming the file if it cannot be read."""
    if file.kind == "pdf":
        return _pdf_pages(file, data, limits)
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise PersonaError(f"knowledge {file.rel}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return [Section(text.replace("\r\n", "\n").replace("\r", "\n"))]


def _pdf_pages(file: KnowledgeFile, data: bytes, limits: KnowledgeLimits) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise PersonaError(f"knowledge {file.rel}: the PDF is encrypted")
        if len(reader.pages) > limits.max_pdf_pages:
            raise PersonaError(f"knowledge {file.rel}: the PDF has {len(reader.pages)} pages, "
                               f"more than {limits.max_pdf_pages}")
        pages = [Section(_clean(page.extract_text() or ""), page=number)
                 for number, page in enumerate(reader.pages, start=1)]
    except PersonaError:
        raise
    # A damaged or hostile PDF can fail deep inside pypdf with almost any exception; each is
    # this one file's problem, reported, not the indexing run's.
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError,
            OSError, ArithmeticError, NotImplementedError, UnicodeError) as exc:
        raise PersonaError(f"knowledge {file.rel}: cannot read the PDF: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return [page for page in pages if page.text.strip()]


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "")
