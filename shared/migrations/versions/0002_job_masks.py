"""jobs.mask_image_ids: one content mask per style (spatial control)

Revision ID: 0002
Revises: 0001
Create Date: 2026-02-01 00:00:00

A nullable JSON list of image ids (NULL: the job has no masks). Adding a nullable column needs no
table rewrite on PostgreSQL or SQLite; existing jobs keep NULL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("mask_image_ids", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("mask_image_ids")
