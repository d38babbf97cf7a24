"""The scale each job resumes at

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 09:00:00

``jobs.resume_scale``: the scale a new attempt of the job starts at, from its latest checkpoint
(``shared.jobstore.resume_scale``: the next scale after one that ended its scale), kept with the
checkpoint list. A GPU worker filling a group takes the waiting jobs of its bucket that start at the
same scale as its own (``shared.dispatch``), so a job with a checkpoint resumes inside a group too,
where before it always ran alone. Unfinished rows with checkpoints get theirs from the list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNFINISHED = ("queued", "running")  # shared.jobs.JobStatus: only these can be resumed


def _resume_scale(refs: list[dict[str, Any]]) -> int:
    """shared.jobstore.resume_scale as of this revision (a migration does not import the app)."""
    if not refs:
        return 0
    last = refs[-1]
    return int(last.get("scale") or 0) + (1 if last.get("end_of_scale") else 0)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("resume_scale", sa.Integer(), nullable=False, server_default="0"))
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("status", sa.String),
        sa.column("checkpoints", sa.JSON),
        sa.column("resume_scale", sa.Integer),
    )
    bind = op.get_bind()
    rows = bind.execute(sa.select(jobs.c.id, jobs.c.checkpoints).where(jobs.c.status.in_(UNFINISHED))).all()
    for job_id, refs in rows:
        scale = _resume_scale(refs or [])
        if scale:
            bind.execute(jobs.update().where(jobs.c.id == job_id).values(resume_scale=scale))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resume_scale")
