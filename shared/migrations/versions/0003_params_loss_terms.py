"""jobs.params: unfinished jobs submitted before relative loss terms keep the raw terms

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 00:00:00

The engine's default loss terms became relative (each term divided by its target's energy) with a
new preset. A job queued (or running) before this release was submitted under the raw terms, and its
explicit weights mean raw-term ratios (style 1e6 : content 1 would mean "style only" on relative
terms). Such jobs get ``"loss_terms": "raw"`` in their stored params, so they run as submitted.
Finished jobs are history and are left alone. No schema change.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOBS = sa.table(
    "jobs", sa.column("id", sa.String), sa.column("status", sa.String), sa.column("params", sa.JSON)
)


def _params(value: Any) -> dict[str, Any]:
    if isinstance(value, str):  # some drivers hand JSON back as text
        value = json.loads(value)
    return dict(value or {})


def upgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_JOBS.c.id, _JOBS.c.params).where(_JOBS.c.status.in_(["queued", "running"]))
    ).all()
    for job_id, raw in rows:
        params = _params(raw)
        if "loss_terms" not in params:
            params["loss_terms"] = "raw"
            bind.execute(sa.update(_JOBS).where(_JOBS.c.id == job_id).values(params=params))


def downgrade() -> None:
    """Nothing to undo: ``loss_terms`` "raw" is what such a job meant before."""
