"""Alignment runs, the run that made a model version, and simulated feedback.

``alignment_runs`` records each reward/PPO/KTO job: its kind, config, the
hash and counts of the dataset snapshot it trained on, status, progress,
metrics per step, the error if it failed and where its output went.
``feedback.simulated`` marks votes cast by `persona-studio simulate` (a
declared rule, not a person), so they can be told apart everywhere.

Revision ID: 0004_alignment_runs
Revises: 0003_feedback_details_and_accounts
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_alignment_runs"
down_revision: str | Sequence[str] | None = "0003_feedback_details_and_accounts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUN_STATUSES = "'queued', 'running', 'succeeded', 'failed', 'interrupted'"


def upgrade() -> None:
    op.create_table(
        "alignment_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("persona_id", sa.String(200), nullable=True),
        sa.Column("config", sa.JSON(), nullable=True),
        sa.Column("dataset_hash", sa.String(64), nullable=True),
        sa.Column("dataset_stats", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(20), server_default="queued", nullable=False),
        sa.Column("progress", sa.Float(), server_default="0", nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("output_dir", sa.String(500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_alignment_runs"),
        sa.CheckConstraint(f"status IN ({RUN_STATUSES})", name="ck_alignment_runs_status"),
    )
    op.add_column("model_versions", sa.Column("run_id", sa.Integer(), nullable=True))
    op.add_column("feedback", sa.Column("simulated", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35), not a batch table copy: a copy of
    # model_versions would lose its expression index, which SQLite cannot reflect.
    op.drop_column("feedback", "simulated")
    op.drop_column("model_versions", "run_id")
    op.drop_table("alignment_runs")
