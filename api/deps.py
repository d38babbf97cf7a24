"""FastAPI dependencies: settings, a database session, the current tenant, storage, publisher, and
the context of a submission (``SubmitCtxDep``)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.commit_recovery import InDoubt
from api.idempotency import IdemRequest
from api.presenters import Linker
from api.publisher import Publisher
from api.ratelimit import STATE_KEY, RateLimiter, client_address, limiter_for
from shared import logs
from shared.db import get_sessionmaker, is_db_outage
from shared.errors import Unauthorized
from shared.settings import Settings
from shared.storage import Storage
from shared.tenants import LOCAL_TENANT, AuthKey, authenticate, get_or_create_tenant

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TenantCtx:
    """The caller: its tenant and the prefix of the API key it used (None with auth off), for the
    audit log (``shared.audit.audit(..., key_prefix=ctx.key_prefix)``)."""

    id: str
    name: str
    key_prefix: str | None = None


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    session = get_sessionmaker(request.app.state.settings.database_url)()
    try:
        yield session
    finally:
        _close_quietly(session)


def _close_quietly(session: Session) -> None:
    """Close after the response may have started: a database that vanished meanwhile must not turn
    into an error then (the ROLLBACK of a dead connection fails; the pool discards it anyway)."""
    try:
        session.close()
    except Exception as exc:
        if not is_db_outage(exc):
            raise
        logs.event(
            logger, "session_close_failed", kind="request", level=logging.WARNING, error=type(exc).__name__
        )


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


# Declared so that OpenAPI has the bearer scheme (``/docs`` "Authorize" works); a missing or
# malformed header is not an error here: ``authenticate`` answers 401 in the API's error shape.
bearer_scheme = HTTPBearer(auto_error=False, description="an API key: `stylequeue keys create`")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def _refuse_remote_when_open(request: Request, settings: Settings) -> None:
    """With auth off, only loopback clients (or a unix socket) act as the local tenant, however
    the app was started (``stylequeue api`` also refuses to bind a public address)."""
    if request.client is None:  # a unix socket
        return
    try:
        remote = not ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        remote = True  # "unknown", an obfuscated forwarded-for: not provably local
    if remote and not settings.auth_off_allow_remote:
        raise Unauthorized(
            "auth_off_remote", "this API runs with STYLEQUEUE_AUTH=off and serves loopback clients only"
        )


def current_tenant(
    request: Request, session: SessionDep, settings: SettingsDep, credentials: BearerDep
) -> TenantCtx:
    """The caller's tenant, under the rate limits (``api.ratelimit``): a sync dependency, so the
    database and the limiter's storage (Redis) are called in the threadpool, never on the event loop.
    Their RateLimit headers go on whatever response the request gets (``RateLimitHeadersMiddleware``)."""
    if settings.auth == "off":
        _refuse_remote_when_open(request, settings)
        cached: TenantCtx | None = getattr(request.app.state, "local_tenant", None)
        if cached is None:
            tenant = get_or_create_tenant(session, LOCAL_TENANT)
            session.commit()
            cached = TenantCtx(tenant.id, tenant.name)
            request.app.state.local_tenant = cached
        return cached
    token = credentials.credentials.strip() if credentials is not None else ""
    limiter = limiter_for(request.app, settings)
    auth = _authenticate(session, limiter, client_address(request), token)
    window = limiter.hit_key(auth.key_id, auth.tenant.rate_limit)
    if window is not None:
        setattr(request.state, STATE_KEY, window.headers())
    return TenantCtx(auth.tenant.id, auth.tenant.name, auth.prefix)


def _authenticate(session: Session, limiter: RateLimiter, address: str, token: str) -> AuthKey:
    """``authenticate``, with an address that failed too often refused before the database; then the
    transaction ends (committing ``last_used_at``), handing the connection back while an upload is
    read."""
    if token:
        limiter.check_client(address, token)
    try:
        auth = authenticate(session, token or None)
    except Unauthorized:
        if token:  # a missing key costs no query: only wrong ones count
            limiter.failed(address)
        raise
    session.commit()
    limiter.succeeded(token)
    return auth


TenantDep = Annotated[TenantCtx, Depends(current_tenant)]


@dataclass(frozen=True)
class SubmitCtx:
    """Everything a submission needs once its request is parsed (passed to the threadpool)."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    publisher: Publisher
    tenant: TenantCtx
    linker: Linker
    indoubt: InDoubt
    idem: IdemRequest | None = None  # set once the request is fingerprinted (api.submission)


async def submit_ctx(
    request: Request, settings: SettingsDep, tenant: TenantDep, storage: StorageDep, publisher: PublisherDep
) -> SubmitCtx:
    return SubmitCtx(
        settings,
        get_sessionmaker(settings.database_url),
        storage,
        publisher,
        tenant,
        Linker(request, settings, storage),
        request.app.state.indoubt,
    )


SubmitCtxDep = Annotated[SubmitCtx, Depends(submit_ctx)]


__all__ = [
    "PublisherDep",
    "SessionDep",
    "SettingsDep",
    "StorageDep",
    "SubmitCtx",
    "SubmitCtxDep",
    "TenantCtx",
    "TenantDep",
    "current_tenant",
    "get_session",
    "submit_ctx",
]
