"""Session epochs: a password change or removal signs the account out everywhere.

``users.session_epoch`` starts at 0 and is raised by ``users passwd``,
``users remove`` and ``users add`` over a password-less name. The server
records the epoch with each sign-in and honours a session only while the
account still has that epoch (chatbot/ui/sessions.py): the CLI runs in
another process, so the database is where the server learns of the change.

Revision ID: 0008_session_epoch
Revises: 0007_api_keys
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_session_epoch"
down_revision: str | Sequence[str] | None = "0007_api_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("session_epoch", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35), not a batch table copy: copying users
    # means dropping it, which the foreign keys of every other table refuse.
    op.drop_column("users", "session_epoch")
