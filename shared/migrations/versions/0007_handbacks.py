"""Hand-backs counted per job

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 21:30:00

``jobs.handbacks``: graceful hand-backs (a worker's shutdown, a transient error retried:
``shared.jobstore.release(graceful=True)``), so ``GET /v1/jobs/{id}`` shows the attempts that counted
exactly (``attempt - handbacks``), whatever ``STYLEQUEUE_MAX_ATTEMPTS`` was or becomes. Rows that exist
get the estimate the API used before: ``max_attempts`` above the default limit (3), at most
``attempt``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_MAX_ATTEMPTS = 3  # shared.settings' default when these rows were made


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("handbacks", sa.Integer(), nullable=False, server_default="0"))
    jobs = sa.table(
        "jobs",
        sa.column("attempt", sa.Integer),
        sa.column("max_attempts", sa.Integer),
        sa.column("handbacks", sa.Integer),
    )
    extra = jobs.c.max_attempts - DEFAULT_MAX_ATTEMPTS
    op.get_bind().execute(
        jobs.update()
        .where(extra > 0)
        .values(handbacks=sa.case((extra < jobs.c.attempt, extra), else_=jobs.c.attempt))
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("handbacks")
