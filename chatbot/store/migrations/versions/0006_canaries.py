"""Canaries: an A/B of a candidate model version on people's thumbs.

``canaries`` records each A/B: the candidate, the control (what served the
persona when it started; NULL for the persona file's adapter or the base
model), the share of new conversations the candidate gets, the minimum votes
per arm, who started it and when, and when and why it ended. A partial unique
index allows one running canary per persona. ``conversations.canary_id`` and
``canary_arm`` record the arm a conversation was given when it was created
(NULL for every existing one: they keep what they had). ``promotions.ab``
keeps the A/B's figures as they were when a version was promoted.

Revision ID: 0006_canaries
Revises: 0005_promotions
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_canaries"
down_revision: str | Sequence[str] | None = "0005_promotions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ARM_CHECK = "canary_arm IN ('control', 'candidate')"


def upgrade() -> None:
    op.create_table(
        "canaries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("persona_id", sa.String(200), nullable=False),
        sa.Column("candidate_id", sa.Integer(), nullable=False),
        sa.Column("control_id", sa.Integer(), nullable=True),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("min_votes", sa.Integer(), nullable=False),
        sa.Column("include_simulated", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("started_by", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_by", sa.String(200), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_canaries"),
        sa.ForeignKeyConstraint(["candidate_id"], ["model_versions.id"],
                                name="fk_canaries_candidate_id_model_versions"),
        sa.ForeignKeyConstraint(["control_id"], ["model_versions.id"],
                                name="fk_canaries_control_id_model_versions"),
        sa.CheckConstraint("share > 0 AND share < 1", name="ck_canaries_share"),
        sa.CheckConstraint("min_votes >= 1", name="ck_canaries_min_votes"),
        sa.CheckConstraint("ended_at IS NULL OR outcome IS NOT NULL", name="ck_canaries_ended_outcome"),
    )
    op.create_index("ix_canaries_persona_id", "canaries", ["persona_id"])
    op.create_index("uq_canaries_running", "canaries", ["persona_id"], unique=True,
                    sqlite_where=sa.text("ended_at IS NULL"), postgresql_where=sa.text("ended_at IS NULL"))

    # Plain ADD COLUMN (not a batch table copy): instant even on a large conversations table.
    # SQLite cannot ALTER in a constraint, but takes it inline in the column's definition.
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE conversations ADD COLUMN canary_id INTEGER "
                   "CONSTRAINT fk_conversations_canary_id_canaries REFERENCES canaries (id)")
        op.execute("ALTER TABLE conversations ADD COLUMN canary_arm VARCHAR(20) "
                   f"CONSTRAINT ck_conversations_canary_arm CHECK ({ARM_CHECK})")
    else:
        op.add_column("conversations", sa.Column("canary_id", sa.Integer(), nullable=True))
        op.add_column("conversations", sa.Column("canary_arm", sa.String(20), nullable=True))
        op.create_foreign_key("fk_conversations_canary_id_canaries", "conversations", "canaries",
                              ["canary_id"], ["id"])
        # op.f: the name as written (SQLite's inline one above), not run through the naming convention again.
        op.create_check_constraint(op.f("ck_conversations_canary_arm"), "conversations", ARM_CHECK)
    op.create_index("ix_conversations_canary_id", "conversations", ["canary_id"])
    op.add_column("promotions", sa.Column("ab", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("promotions", "ab")
    op.drop_index("ix_conversations_canary_id", table_name="conversations")
    if op.get_bind().dialect.name == "sqlite":
        # SQLite cannot drop a column that is part of a foreign key: a batch table copy.
        with op.batch_alter_table("conversations") as batch:
            batch.drop_constraint(op.f("ck_conversations_canary_arm"), type_="check")
            batch.drop_column("canary_arm")
            batch.drop_column("canary_id")
    else:
        op.drop_constraint(op.f("ck_conversations_canary_arm"), "conversations", type_="check")
        op.drop_constraint("fk_conversations_canary_id_canaries", "conversations", type_="foreignkey")
        op.drop_column("conversations", "canary_arm")
        op.drop_column("conversations", "canary_id")
    op.drop_index("uq_canaries_running", table_name="canaries")
    op.drop_index("ix_canaries_persona_id", table_name="canaries")
    op.drop_table("canaries")
