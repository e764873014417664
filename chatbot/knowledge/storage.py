"""The knowledge tables: which files of a persona are indexed, and their chunks.

Each changed file is written in its own short transaction (its old chunks
deleted, the new ones inserted), after its embedding is done outside any
transaction: a long indexing run never holds SQLite's write lock for more
than one file's rows, so chats keep saving their messages meanwhile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime

import numpy as np
from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from chatbot.store.base import DetachedRow, StoreBase
from chatbot.store.models import KnowledgeChunk, KnowledgeDocument, utcnow

from .chunking import Chunk


@dataclasses.dataclass(frozen=True)
class DocumentRecord(DetachedRow):
    id: int
    persona_id: str
    path: str
    content_hash: str
    embedder: str
    chunker: str
    size: int
    chunk_count: int
    indexed_at: datetime


@dataclasses.dataclass(frozen=True)
class ChunkRecord:
    """A chunk as a search returns it: its text and where it is, without its vector."""

    id: int
    path: str
    text: str
    heading: str | None
    page: int | None
    line_start: int
    line_end: int
    char_start: int
    char_end: int


class KnowledgeStore(StoreBase):
    def documents(self, persona_id: str) -> list[DocumentRecord]:
        with self.read_session() as session:
            rows = session.scalars(select(KnowledgeDocument).where(KnowledgeDocument.persona_id == persona_id)
                                   .order_by(KnowledgeDocument.path))
            return [DocumentRecord.from_row(row) for row in rows]

    def has_documents(self, persona_id: str, embedder: str) -> bool:
        with self.read_session() as session:
            return session.scalar(select(func.count()).select_from(KnowledgeDocument).where(
                KnowledgeDocument.persona_id == persona_id, KnowledgeDocument.embedder == embedder,
                KnowledgeDocument.chunk_count > 0)) > 0

    def replace_document(self, persona_id: str, path: str, *, content_hash: str, embedder: str, chunker: str,
                         size: int, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        """Store a file's new chunks in place of whatever it had (one transaction)."""
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")

        def work(session: Session) -> None:
            _delete(session, persona_id, [path])
            document_id = session.scalar(insert(KnowledgeDocument).values(
                persona_id=persona_id, path=path, content_hash=content_hash, embedder=embedder,
                chunker=chunker, size=size, chunk_count=len(chunks), indexed_at=utcnow(),
            ).returning(KnowledgeDocument.id))
            if chunks:
                session.execute(insert(KnowledgeChunk), [
                    {"document_id": document_id, "ordinal": ordinal, "embedding": vector,
                     "heading": chunk.heading, "page": chunk.page, "line_start": chunk.line_start,
                     "line_end": chunk.line_end, "char_start": chunk.char_start, "char_end": chunk.char_end,
                     "text": chunk.text}
                    for ordinal, (chunk, vector) in enumerate(zip(chunks, vectors))
                ])

        self.write(work)

    def delete_documents(self, persona_id: str, paths: Sequence[str] | None = None) -> int:
        """Forget the files `paths` of a persona (all of them for None); returns how many there were."""
        return self.write(lambda session: _delete(session, persona_id, paths))

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkRecord]:
        if not ids:
            return {}
        with self.read_session() as session:
            rows = session.execute(
                select(KnowledgeChunk.id, KnowledgeDocument.path, KnowledgeChunk.text, KnowledgeChunk.heading,
                       KnowledgeChunk.page, KnowledgeChunk.line_start, KnowledgeChunk.line_end,
                       KnowledgeChunk.char_start, KnowledgeChunk.char_end)
                .join(KnowledgeDocument, KnowledgeDocument.id == KnowledgeChunk.document_id)
                .where(KnowledgeChunk.id.in_(list(ids))))
            return {row.id: ChunkRecord(**row._asdict()) for row in rows}


def _delete(session: Session, persona_id: str, paths: Sequence[str] | None) -> int:
    # The chunks explicitly, not through ON DELETE CASCADE: that needs SQLite's foreign_keys
    # pragma, which an engine made elsewhere may not set.
    where = [KnowledgeDocument.persona_id == persona_id]
    if paths is not None:
        if not paths:
            return 0
        where.append(KnowledgeDocument.path.in_(list(paths)))
    ids = list(session.scalars(select(KnowledgeDocument.id).where(*where)))
    if ids:
        session.execute(delete(KnowledgeChunk).where(KnowledgeChunk.document_id.in_(ids)))
        session.execute(delete(KnowledgeDocument).where(KnowledgeDocument.id.in_(ids)))
    return len(ids)
