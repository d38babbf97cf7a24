"""Webhooks: each job's and batch's target and event filter, the tenants' signing secrets, the
outbox of events and their delivery attempts

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 21:00:00

* ``jobs.webhook``, ``jobs.webhook_events``; ``batches.webhook``, ``batches.webhook_events`` and
  ``batches.finished_count`` (jobs of a webhook batch that finished: ``batch.completed`` is emitted
  by the move that makes it ``job_count``).
* ``tenants.webhook_secret`` (made on first use), ``webhook_secret_previous`` and until when it
  still signs, after a rotation.
* ``webhook_events``: the outbox (``shared.webhooks``); ``webhook_attempts``: one row per attempt.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook", sa.String(2048), nullable=True))
        batch.add_column(sa.Column("webhook_events", sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("webhook", sa.String(2048), nullable=True))
        batch.add_column(sa.Column("webhook_events", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("finished_count", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("webhook_secret", sa.String(100), nullable=True))
        batch.add_column(sa.Column("webhook_secret_previous", sa.String(100), nullable=True))
        batch.add_column(sa.Column("webhook_secret_previous_until", _TZ, nullable=True))
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "tenant_id", sa.String(36), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("batch_id", sa.String(36), nullable=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _TZ, nullable=False),
        sa.Column("published_at", _TZ, nullable=True),
        sa.Column("lease_until", _TZ, nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("finished_at", _TZ, nullable=True),
    )
    op.create_index("ix_webhook_events_due", "webhook_events", ["state", "next_attempt_at"])
    op.create_index("ix_webhook_events_finished", "webhook_events", ["finished_at"])
    op.create_index("ix_webhook_events_tenant_id", "webhook_events", ["tenant_id"])
    op.create_index("ix_webhook_events_job_id", "webhook_events", ["job_id"])
    op.create_index("ix_webhook_events_batch_id", "webhook_events", ["batch_id"])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "event_id",
            sa.String(40),
            sa.ForeignKey("webhook_events.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("error", sa.String(300), nullable=True),
        sa.Column("at", _TZ, nullable=False),
    )
    op.create_index("ix_webhook_attempts_event_id", "webhook_attempts", ["event_id"])
    op.create_index("ix_webhook_attempts_job", "webhook_attempts", ["job_id", "id"])


def downgrade() -> None:
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_events")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("webhook_secret_previous_until")
        batch.drop_column("webhook_secret_previous")
        batch.drop_column("webhook_secret")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("finished_count")
        batch.drop_column("webhook_events")
        batch.drop_column("webhook")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("webhook_events")
        batch.drop_column("webhook")
