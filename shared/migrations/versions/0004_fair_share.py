"""Fair share: the database is the queue; workers register; tenant limits; key lifecycle; deletion

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 12:00:00

* ``jobs.priority`` (within a tenant's share) and ``jobs.cost`` (pixels x iterations, what the fair
  dispatcher charges a tenant), ``jobs.deleted_at`` (deleted by its tenant: hidden, purged later);
  an index serving the dispatcher's "each tenant's next queued job".
* ``batches.deleted_at``.
* ``tenants``: a share ``weight`` and optional per-tenant overrides of the limits (NULL: the setting).
* ``api_keys``: ``expires_at`` (rotation's overlap, or an expiry given at creation), ``last_used_at``.
* ``tenant_usage``: compute charged per tenant and UTC day (megapixel-iterations), kept when jobs
  are deleted so that deleting does not refill a budget.
* ``workers``: one row per registered worker process, with its heartbeat.

Existing jobs get priority 0 and cost 0 (unknown: they were admitted before costs were kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("cost", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_dispatch", "jobs", ["status", "tenant_id", "priority", "created_at", "id"], unique=False
    )
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("weight", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("max_queued", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_running", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("daily_budget_mpi", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("rate_limit", sa.String(200), nullable=True))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "tenant_usage",
        sa.Column(
            "tenant_id", sa.String(36), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("mpi", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("tenant_id", "day"),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("weights", sa.String(300), nullable=False),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_workers_heartbeat", "workers", ["heartbeat_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_workers_heartbeat", table_name="workers")
    op.drop_table("workers")
    op.drop_table("tenant_usage")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("last_used_at")
        batch.drop_column("expires_at")
    with op.batch_alter_table("tenants") as batch:
        for name in ("rate_limit", "daily_budget_mpi", "max_running", "max_queued", "weight"):
            batch.drop_column(name)
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("deleted_at")
    op.drop_index("ix_jobs_dispatch", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for name in ("deleted_at", "cost", "priority"):
            batch.drop_column(name)
