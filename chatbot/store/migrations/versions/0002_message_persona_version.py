"""Every message records the persona id and version (content hash) that produced it.

Until now only the conversation did. Existing messages are back-filled from
their conversation, which is what produced them.

Revision ID: 0002_message_persona_version
Revises: 0001_initial
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_message_persona_version"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (not a batch table copy): instant even on a large messages table.
    op.add_column("messages", sa.Column("persona_id", sa.String(200), nullable=True))
    op.add_column("messages", sa.Column("persona_hash", sa.String(128), nullable=True))
    op.execute(
        "UPDATE messages SET "
        "persona_id = (SELECT c.persona_id FROM conversations c WHERE c.id = messages.conversation_id), "
        "persona_hash = (SELECT c.persona_hash FROM conversations c WHERE c.id = messages.conversation_id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("persona_hash")
        batch.drop_column("persona_id")
