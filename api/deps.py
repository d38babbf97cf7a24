"""FastAPI dependencies: settings, a database session, the current tenant, storage, publisher."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.publisher import Publisher
from shared.db import get_sessionmaker
from shared.settings import Settings
from shared.storage import Storage
from shared.tenants import LOCAL_TENANT, authenticate, get_or_create_tenant


@dataclass(frozen=True)
class TenantCtx:
    id: str
    name: str


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    session = get_sessionmaker(request.app.state.settings.database_url)()
    try:
        yield session
    finally:
        session.close()


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_publisher(request: Request) -> Publisher:
    publisher: Publisher = request.app.state.publisher
    return publisher


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def current_tenant(request: Request, session: SessionDep, settings: SettingsDep) -> TenantCtx:
    if settings.auth == "off":
        cached: TenantCtx | None = getattr(request.app.state, "local_tenant", None)
        if cached is None:
            tenant = get_or_create_tenant(session, LOCAL_TENANT)
            session.commit()
            cached = TenantCtx(tenant.id, tenant.name)
            request.app.state.local_tenant = cached
        return cached
    tenant = authenticate(session, _bearer(request))
    return TenantCtx(tenant.id, tenant.name)


TenantDep = Annotated[TenantCtx, Depends(current_tenant)]

__all__ = [
    "PublisherDep",
    "SessionDep",
    "SettingsDep",
    "StorageDep",
    "TenantCtx",
    "TenantDep",
    "current_tenant",
    "get_session",
]
