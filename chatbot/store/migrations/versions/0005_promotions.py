"""Promotions: the append-only log of which model version serves which persona.

Each row is a "promote" (push a version onto the persona's stack) or a
"rollback" (pop the top one); what serves a persona is that stack's top, or,
when it is empty, the persona file's own adapter. ``model_versions.status``
follows the log (the top of a stack is "serving", versions taken off or
pushed down are "retired").

Revision ID: 0005_promotions
Revises: 0004_alignment_runs
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_promotions"
down_revision: str | Sequence[str] | None = "0004_alignment_runs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "promotions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("persona_id", sa.String(200), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("forced", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("gate", sa.JSON(), nullable=True),
        sa.Column("by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_promotions"),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"],
                                name="fk_promotions_version_id_model_versions"),
        sa.CheckConstraint("action IN ('promote', 'rollback')", name="ck_promotions_action"),
        sa.CheckConstraint("NOT forced OR reason IS NOT NULL", name="ck_promotions_forced_reason"),
    )
    op.create_index("ix_promotions_persona_id", "promotions", ["persona_id"])
    op.create_index("ix_promotions_version_id", "promotions", ["version_id"])


def downgrade() -> None:
    op.drop_index("ix_promotions_version_id", table_name="promotions")
    op.drop_index("ix_promotions_persona_id", table_name="promotions")
    op.drop_table("promotions")
