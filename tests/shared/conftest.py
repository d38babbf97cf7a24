"""An empty, migrated database on SQLite and on PostgreSQL for each test: ``db_url`` with tenant t1 and
one image, ``sessions`` (the reconciler and idempotency tests) with tenants t1 and t2."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from shared.db import get_sessionmaker
from shared.migrate import upgrade
from shared.models import Base, Job, StoredImage, Tenant
from tests.support.jobs import IMAGE, MakeJob


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Every table emptied, then tenant t1 and one stored image for the jobs to name."""
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    with get_sessionmaker(url)() as s:
        for table in reversed(Base.metadata.sorted_tables):
            s.execute(table.delete())
        s.add(Tenant(id="t1", name="t1"))
        s.add(
            StoredImage(id=IMAGE, format="PNG", width=32, height=32, bytes=10, storage_key=f"images/{IMAGE}")
        )
        s.commit()
    return url


@pytest.fixture
def make_job(db_url: str) -> MakeJob:
    """A job row with these fields (written directly: the tests set up any state)."""

    def make(**fields: Any) -> str:
        job = Job(tenant_id="t1", content_image_id=IMAGE, style_image_ids=[IMAGE], **fields)
        with get_sessionmaker(db_url)() as s:
            s.add(job)
            s.commit()
            return job.id

    return make


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
