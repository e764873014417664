"""Provenance of a reply: the persona knowledge that reached its prompt.

``messages.provenance`` (JSON, null for rows written before it and for user
messages) records what a persona's knowledge added to the prompt of that
reply: which lorebook entries fired and on which key, and which document
chunks were retrieved, with their scores. The prompt itself is already in
``messages.prompt``; this says why each added part is there.

Revision ID: 0010_message_provenance
Revises: 0009_jobs
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_message_provenance"
down_revision: str | Sequence[str] | None = "0009_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("provenance", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("messages", "provenance")
