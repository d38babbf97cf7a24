"""GPU groups: each job's bucket (which jobs can share a batch) and how it was executed

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 18:00:00

* ``jobs.bucket``: ``shared.buckets.bucket_key``, set at submission; NULL for jobs submitted before
  (they run alone). Indexed with the status for the worker's "more waiting jobs of my bucket".
* ``jobs.execution``: how the attempt that ended the job ran (device, precision, weights, group
  size, engine seconds), shown by ``GET /v1/jobs/{id}``.
* ``jobs.emptied_at``: when retention or a delete removed the job's result and checkpoints (it was
  a ``result_expired_at`` key in ``progress``, moved here).
* Unfinished jobs get ``params.exact_aspect = true``: they were submitted to run at their content's
  exact aspect ratio, and their checkpoints were made that way (a snapped run would not resume them).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("bucket", sa.String(32), nullable=True))
        batch.add_column(sa.Column("execution", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("emptied_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_bucket", "jobs", ["status", "bucket", "created_at"], unique=False)
    _move_emptied_marks()
    _keep_exact_aspect()


def _keep_exact_aspect() -> None:
    jobs = sa.table(
        "jobs", sa.column("id", sa.String), sa.column("status", sa.String), sa.column("params", sa.JSON)
    )
    bind = op.get_bind()
    unfinished = jobs.c.status.in_(["queued", "running"])
    for job_id, params in bind.execute(sa.select(jobs.c.id, jobs.c.params).where(unfinished)).all():
        bind.execute(
            jobs.update().where(jobs.c.id == job_id).values(params={**(params or {}), "exact_aspect": True})
        )


def _move_emptied_marks() -> None:
    """``progress["result_expired_at"]`` (ISO time) -> ``emptied_at``, in Python: the JSON operators
    of SQLite and PostgreSQL differ, and only emptied jobs (few) match the LIKE."""
    from datetime import datetime

    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("progress", sa.JSON),
        sa.column("emptied_at", sa.DateTime),
    )
    bind = op.get_bind()
    marked = sa.cast(jobs.c.progress, sa.Text).like('%"result_expired_at"%')
    for job_id, progress in bind.execute(sa.select(jobs.c.id, jobs.c.progress).where(marked)).all():
        stamp = (progress or {}).pop("result_expired_at", None)
        if stamp is None:
            continue
        bind.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(emptied_at=datetime.fromisoformat(stamp), progress=progress)
        )


def downgrade() -> None:
    op.drop_index("ix_jobs_bucket", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("emptied_at")
        batch.drop_column("execution")
        batch.drop_column("bucket")
