"""Per-tenant quotas checked when jobs are submitted: queued jobs and a daily compute budget.

``admit`` runs inside the submission's transaction, before the job rows are inserted: a refusal
raises and the transaction is rolled back, so a refused submission creates nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.orm import Session

from shared.settings import Settings

logger = logging.getLogger(__name__)


def admit(session: Session, tenant_id: str, costs: Sequence[int], settings: Settings) -> None:
    """Charge ``costs`` (one per job, pixels x iterations) to the tenant, or refuse them all."""
    return None  # implemented with the quotas (issue 10)
