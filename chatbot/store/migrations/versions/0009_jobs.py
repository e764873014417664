"""The job queue: alignment work asked for in the app and done by a worker process.

One row per job (``jobs``): a training job (reward, ppo, kto, dpo), an
evaluation or a simulation, with what was asked (``request``), its status,
progress, result or error, the file its output goes to, and the worker's
heartbeat. A partial unique index allows one running job at a time: on a
CPU machine two jobs at once would each run at half speed, and claiming the
next job is then one insert-or-fail, however many workers race for it.

Revision ID: 0009_jobs
Revises: 0008_session_epoch
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_jobs"
down_revision: str | Sequence[str] | None = "0008_session_epoch"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = ("reward", "ppo", "kto", "dpo", "evaluate", "simulate")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("persona_id", sa.String(length=200), nullable=True),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=20), server_default="queued", nullable=False),
        sa.Column("progress", sa.Float(), server_default="0", nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("log_path", sa.String(length=500), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("requested_by", sa.String(length=200), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint(_in("kind", KINDS), name="ck_jobs_kind"),
        sa.CheckConstraint(_in("status", STATUSES), name="ck_jobs_status"),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="ck_jobs_progress"),
        sa.ForeignKeyConstraint(["run_id"], ["alignment_runs.id"], name="fk_jobs_run_id_alignment_runs"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"], unique=False)
    op.create_index("uq_jobs_running", "jobs", ["status"], unique=True,
                    sqlite_where=sa.text("status = 'running'"), postgresql_where=sa.text("status = 'running'"))


def downgrade() -> None:
    op.drop_index("uq_jobs_running", table_name="jobs")
    op.drop_index("ix_jobs_status", table_name="jobs")
    op.drop_table("jobs")
