"""One audit line per API-key use that creates or deletes something."""

from __future__ import annotations

import logging
from typing import Any

from shared import logs

logger = logging.getLogger(__name__)


def audit(
    action: str, *, tenant_id: str, key_prefix: str | None, job_id: str | None = None, **fields: Any
) -> None:
    """Log ``audit action=... tenant_id=... key=...``: who did what, in the service's one log shape."""
    logs.event(
        logger,
        "audit",
        kind="audit",
        job_id=job_id,
        action=action,
        tenant_id=tenant_id,
        key=key_prefix or "-",
        **fields,
    )
