"""Feedback reasons, comments and the history of vote changes; password hashes for accounts.

``feedback`` keeps one current vote per user and message; ``feedback_events``
appends a row for every change (vote, change, clear, reason or comment), so
how opinions moved is never lost. Existing votes get one event each.

Revision ID: 0003_feedback_details_and_accounts
Revises: 0002_message_persona_version
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_feedback_details_and_accounts"
down_revision: str | Sequence[str] | None = "0002_message_persona_version"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # This revision's id has 34 characters and Alembic's version column holds
    # 32. SQLite ignores the length; PostgreSQL does not. Widen it first: the
    # new version is written after this function, in the same transaction.
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column(
            "alembic_version", "version_num",
            type_=sa.String(128), existing_type=sa.String(32), existing_nullable=False,
        )
    op.add_column("users", sa.Column("password_hash", sa.String(255), nullable=True))
    op.add_column("feedback", sa.Column("reason", sa.String(200), nullable=True))
    op.add_column("feedback", sa.Column("comment", sa.Text(), nullable=True))
    op.create_table(
        "feedback_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("feedback_id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("rating", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(200), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_feedback_events"),
        sa.ForeignKeyConstraint(["feedback_id"], ["feedback.id"], name="fk_feedback_events_feedback_id_feedback"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], name="fk_feedback_events_message_id_messages"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_feedback_events_user_id_users"),
    )
    op.create_index("ix_feedback_events_feedback_id", "feedback_events", ["feedback_id"])
    op.execute(
        "INSERT INTO feedback_events (feedback_id, message_id, user_id, rating, created_at) "
        "SELECT id, message_id, user_id, rating, updated_at FROM feedback"
    )


def downgrade() -> None:
    # alembic_version.version_num stays wide: harmless, and shrinking it back
    # would fail if a longer id were ever stamped.
    op.drop_index("ix_feedback_events_feedback_id", table_name="feedback_events")
    op.drop_table("feedback_events")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("comment")
        batch.drop_column("reason")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("password_hash")
