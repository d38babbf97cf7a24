"""Signed-out web sessions

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 09:00:00

``web_session_revocations``: the session id (``sid``) of each web page session that was signed out,
until its token expires. A session cookie is a signed token that names an API key's row, so signing out
used to delete only the browser's cookie: a copy of it kept working until it expired (up to
``STYLEQUEUE_WEB_SESSION_HOURS``). ``api.web.auth`` now refuses a token whose sid is here; each
sign-out also deletes the rows past ``expires_at``, so the table holds only the sessions signed out
within the last ``STYLEQUEUE_WEB_SESSION_HOURS``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SID_CHARS = 43  # api.web.tokens.new_nonce: secrets.token_urlsafe(32)


def upgrade() -> None:
    op.create_table(
        "web_session_revocations",
        sa.Column("sid", sa.String(SID_CHARS), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_web_session_revocations_expires_at", "web_session_revocations", ["expires_at"])


def downgrade() -> None:
    op.drop_table("web_session_revocations")
