"""KnowledgeIndex: a persona's documents, chunked and embedded into the app's database, searched by meaning.

    index = KnowledgeIndex(store.engine, embedder)        # the embedder is loaded once and shared
    report = index.index_persona("shopkeeper", personas_folder, persona.knowledge)
    hits = index.search("shopkeeper", user_message, k=4, min_score=0.3)

Indexing is incremental, per file: a file whose bytes hash the same as when
it was indexed (with the same model and chunk settings) is skipped; a changed
one is chunked and embedded again; a file no longer listed, or now refused,
loses its chunks. A bad file is reported in the returned `IndexReport` and
does not stop the others.

A search embeds the query (one forward pass of the small model: tens of
milliseconds on a CPU) and asks the database for the nearest chunks (see
search.py); nothing is cached between calls, so any number of threads can
search while another indexes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import Engine

from chatbot.personas import PersonaError
from chatbot.store.db import make_engine, migrate

from . import search as vector_search
from .chunking import ChunkSettings, chunk_sections
from .embedding import Embedder
from .files import KnowledgeFile, KnowledgeLimits, find_files, read_bytes
from .readers import read_sections
from .storage import DocumentRecord, KnowledgeStore

# progress(files done, files in all, the file now being read or "" at the end)
Progress = Callable[[int, int, str], None]
MAX_K = 50


@dataclass
class IndexReport:
    """What an indexing run did, by file (paths relative to the personas folder)."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unchanged since they were indexed
    errors: list[str] = field(default_factory=list)  # one line each, starting with "knowledge PATH:"
    chunks_embedded: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk and where it is, for the prompt and for a citation."""

    text: str
    path: str  # relative to the personas folder
    location: str  # "lines 12-18" or "page 3"
    score: float  # cosine similarity to the query, -1 to 1
    heading: str | None
    page: int | None
    line_start: int
    line_end: int
    char_start: int
    char_end: int
    chunk_id: int

    @property
    def citation(self) -> str:
        """`notes/refunds.md, lines 12-18 (Shop policies > Refunds)`."""
        return f"{self.path}, {self.location}" + (f" ({self.heading})" if self.heading else "")


def _location(page: int | None, line_start: int, line_end: int) -> str:
    if page is not None:
        return f"page {page}"
    return f"line {line_start}" if line_start == line_end else f"lines {line_start}-{line_end}"


class KnowledgeIndex:
    """Persona knowledge in the app's database. `database` is the store's engine, or a URL (migrated here)."""

    def __init__(self, database: Engine | str, embedder: Embedder, *, limits: KnowledgeLimits = KnowledgeLimits(),
                 chunking: ChunkSettings = ChunkSettings(), search: str = "auto") -> None:
        self._owns_engine = isinstance(database, str)
        engine = make_engine(database) if isinstance(database, str) else database
        if self._owns_engine:
            migrate(engine)
        self.engine = engine
        self.embedder = embedder
        self.limits = limits
        self.chunking = chunking
        self.store = KnowledgeStore(engine)
        self._search = vector_search.choose(engine, search)

    @property
    def backend(self) -> str:
        """Which vector search this database got: sqlite-vec, pgvector or numpy."""
        return self._search.name

    def index_persona(self, persona_id: str, folder: Path, paths: Sequence[str],
                      progress: Progress | None = None) -> IndexReport:
        """Bring the persona's indexed documents in line with the files `paths` name under `folder`.

        One run per persona at a time: a run removes what its own `paths` do not name.
        """
        if isinstance(paths, str):  # one entry, not its characters
            paths = [paths]
        files, errors = find_files(Path(folder), list(paths), self.limits)
        report = IndexReport(errors=errors)
        known = {document.path: document for document in self.store.documents(persona_id)}
        kept: set[str] = set()
        chunk_total = 0
        for done, file in enumerate(files):
            if progress:
                progress(done, len(files), file.rel)
            try:
                outcome, chunks = self._index_file(persona_id, file, known.get(file.rel), chunk_total)
            except PersonaError as exc:
                report.errors.append(str(exc))
                continue
            kept.add(file.rel)
            chunk_total += chunks
            getattr(report, outcome).append(file.rel)
            if outcome != "skipped":
                report.chunks_embedded += chunks
        if progress:
            progress(len(files), len(files), "")
        report.removed = sorted(path for path in known if path not in kept)
        self.store.delete_documents(persona_id, report.removed)
        return report

    def _index_file(self, persona_id: str, file: KnowledgeFile, known: DocumentRecord | None, chunk_total: int
                    ) -> tuple[str, int]:
        """("added" | "updated" | "skipped", its chunk count); PersonaError for a file that cannot be indexed."""
        data = read_bytes(file, self.limits)
        digest = hashlib.sha256(data).hexdigest()
        if (known is not None and known.content_hash == digest and known.embedder == self.embedder.name
                and known.chunker == self.chunking.signature):
            if chunk_total + known.chunk_count > self.limits.max_chunks:
                raise self._too_many(file.rel, known.chunk_count)
            return "skipped", known.chunk_count
        chunks = chunk_sections(read_sections(file, data, self.limits), file.kind,
                                self.embedder.count_tokens, self.chunking)
        if chunk_total + len(chunks) > self.limits.max_chunks:
            raise self._too_many(file.rel, len(chunks))
        vectors = (self.embedder.embed([chunk.embedding_text for chunk in chunks]) if chunks
                   else np.zeros((0, self.embedder.dimension), np.float32))
        self.store.replace_document(persona_id, file.rel, content_hash=digest, embedder=self.embedder.name,
                                    chunker=self.chunking.signature, size=len(data), chunks=chunks,
                                    vectors=vectors)
        return ("updated" if known is not None else "added"), len(chunks)

    def _too_many(self, rel: str, count: int) -> PersonaError:
        return PersonaError(f"knowledge {rel}: its {count} chunks would take the persona past "
                            f"{self.limits.max_chunks} chunks; not indexed")

    def search(self, persona_id: str, query: str, k: int = 4, min_score: float = 0.3) -> list[Hit]:
        """The `k` chunks of the persona most similar to `query` with a score of at least `min_score`."""
        if not query.strip() or not self.store.has_documents(persona_id, self.embedder.name):
            return []  # no model call for a persona without knowledge
        return self.search_vector(persona_id, self.embedder.embed([query])[0], k, min_score)

    def search_vector(self, persona_id: str, vector: np.ndarray, k: int = 4, min_score: float = 0.3
                      ) -> list[Hit]:
        """`search` for a query already embedded (a unit vector from this index's embedder)."""
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be 1 to {MAX_K}, not {k}")
        if not -1.0 <= min_score <= 1.0 or math.isnan(min_score):
            raise ValueError(f"min_score is a cosine similarity, -1 to 1, not {min_score}")
        nearest = [(chunk_id, score) for chunk_id, score in
                   self._search.nearest(persona_id, self.embedder.name, vector, k) if score >= min_score]
        rows = self.store.chunks([chunk_id for chunk_id, _ in nearest])
        return [Hit(text=row.text, path=row.path, location=_location(row.page, row.line_start, row.line_end),
                    score=float(score), heading=row.heading, page=row.page, line_start=row.line_start,
                    line_end=row.line_end, char_start=row.char_start, char_end=row.char_end, chunk_id=chunk_id)
                for chunk_id, score in nearest
                if (row := rows.get(chunk_id)) is not None]  # None: re-indexed since the scan

    def documents(self, persona_id: str) -> list[DocumentRecord]:
        """What is indexed for the persona, by path."""
        return self.store.documents(persona_id)

    def remove_persona(self, persona_id: str) -> int:
        """Forget all of a persona's knowledge (when the persona is deleted); returns its file count."""
        return self.store.delete_documents(persona_id)

    def close(self) -> None:
        self._search.close()
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> KnowledgeIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
