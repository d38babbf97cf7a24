"""An empty, migrated database on SQLite and on PostgreSQL for each test of this folder."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from shared.db import get_sessionmaker
from shared.migrate import upgrade
from shared.models import Base, Tenant


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest) -> sessionmaker[Session]:
    """Every table emptied (the reconciler looks at every job), with tenants t1 and t2."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    maker = get_sessionmaker(url)
    with maker() as s:
        for table in reversed(Base.metadata.sorted_tables):
            s.execute(table.delete())
        s.add_all([Tenant(id="t1", name="t1"), Tenant(id="t2", name="t2")])
        s.commit()
    return maker
