"""Persona knowledge documents, their chunks and the chunks' vectors.

``knowledge_documents`` has a row per file a persona's ``knowledge:`` names, as
last indexed: its content hash (unchanged files are not embedded again), the
embedding model and chunk settings used. ``knowledge_chunks`` has the pieces
of each file with their vectors and where they are in the file.

The vector column is the same on every server: a float32 BLOB on SQLite
(read by sqlite-vec's distance functions) and ``real[]`` on PostgreSQL (cast
to pgvector's ``vector`` in queries where the server has pgvector). Using
pgvector's own column type would make this migration fail on a server
without the extension.

Revision ID: 0011_knowledge_chunks
Revises: 0010_message_provenance
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011_knowledge_chunks"
down_revision: str | Sequence[str] | None = "0010_message_provenance"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "knowledge_documents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("persona_id", sa.String(length=200), nullable=False),
        sa.Column("path", sa.String(length=1000), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("embedder", sa.String(length=200), nullable=False),
        sa.Column("chunker", sa.String(length=200), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("indexed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_knowledge_documents"),
        sa.UniqueConstraint("persona_id", "path", name="uq_knowledge_documents_persona_id_path"),
    )
    op.create_table(
        "knowledge_chunks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("document_id", sa.Integer(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("embedding", sa.LargeBinary().with_variant(postgresql.ARRAY(postgresql.REAL()), "postgresql"),
                  nullable=False),
        sa.Column("heading", sa.Text(), nullable=True),
        sa.Column("page", sa.Integer(), nullable=True),
        sa.Column("line_start", sa.Integer(), nullable=False),
        sa.Column("line_end", sa.Integer(), nullable=False),
        sa.Column("char_start", sa.Integer(), nullable=False),
        sa.Column("char_end", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["document_id"], ["knowledge_documents.id"],
                                name="fk_knowledge_chunks_document_id_knowledge_documents", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_knowledge_chunks"),
    )
    op.create_index("ix_knowledge_chunks_document_id", "knowledge_chunks", ["document_id"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        # A row past 2 KB gets its largest value moved out of line (TOAST): with a chunk's text beside
        # it, that would be the 1.5 KB vector, fetched apart for every row of every search. MAIN keeps
        # the vector in the row; the text is moved out instead, and only the k hits' texts are read.
        op.execute("ALTER TABLE knowledge_chunks ALTER COLUMN embedding SET STORAGE MAIN")


def downgrade() -> None:
    op.drop_index("ix_knowledge_chunks_document_id", table_name="knowledge_chunks")
    op.drop_table("knowledge_chunks")
    op.drop_table("knowledge_documents")
