"""The FastAPI application: ``create_app(settings)``; OpenAPI at ``/docs``.

``uvicorn --factory api.app:create_app`` or ``stylequeue api``. With SQLite (the embedded default) the
migrations run at startup; on PostgreSQL run ``stylequeue migrate`` when deploying.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from api.commit_recovery import InDoubt
from api.errors import install_error_handlers
from api.limits import BodyLimitMiddleware
from api.metrics import MetricsMiddleware
from api.metrics import router as metrics_router
from api.offload import Admission, cpu_pool
from api.publisher import CeleryPublisher, Publisher
from api.ratelimit import RateLimitHeadersMiddleware
from api.routes import batches, events, health, images, jobs, results, status, webhooks
from api.web import STATIC_PATH, static_files
from api.web import router as web_router
from shared import logs
from shared.db import get_sessionmaker
from shared.settings import Settings, get_settings
from shared.storage import Storage, open_storage

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    publisher: Publisher | None = None,
    storage: Storage | None = None,
    migrate: bool | None = None,
) -> FastAPI:
    """Build the app. ``publisher``/``storage`` replace the configured ones (tests);
    ``migrate`` defaults to True for SQLite only."""
    settings = settings or get_settings()
    if migrate is None:
        migrate = settings.database_url.startswith("sqlite")
    if migrate:
        from shared.migrate import upgrade

        upgrade(settings.database_url)
    app = FastAPI(
        title="stylequeue",
        version="0.1.0",
        description="Batch neural style transfer as a service.",
        docs_url="/docs",
    )
    app.state.settings = settings
    app.state.storage = storage or open_storage(settings)
    app.state.publisher = publisher or CeleryPublisher(settings)
    app.state.cpu_pool = cpu_pool(settings)
    app.state.admission = Admission(settings.max_inflight_uploads)
    app.state.indoubt = InDoubt(get_sessionmaker(settings.database_url))
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(RateLimitHeadersMiddleware)
    app.add_middleware(MetricsMiddleware)  # outermost: it sees the body limit's answers too
    app.include_router(metrics_router)  # GET /metrics: 404 unless STYLEQUEUE_METRICS_TOKEN is set
    for module in (health, images, jobs, results, batches, status, webhooks, events):
        app.include_router(module.router)
    app.include_router(web_router)  # the web page (/web): session cookie + CSRF, see api.web.auth
    app.mount(STATIC_PATH, static_files(), name="web-static")
    if settings.auth == "off":
        logs.event(
            logger,
            "auth_off",
            kind="api",
            level=logging.WARNING,
            warning="AUTHENTICATION IS OFF: every caller acts as the local tenant; serve only on loopback",
        )
    logs.event(
        logger,
        "app_created",
        kind="api",
        auth=settings.auth,
        database=settings.database_url.split(":", 1)[0],
        storage=settings.storage_url.split(":", 1)[0],
    )
    return app


__all__ = ["create_app"]
