"""The page's GET routes: sign-in, the batch list, a batch's grid, a job, a batch's gallery, the submit
form. Server-rendered (they work without JavaScript); the scripts only add live updates, the loss
curve and the drag-and-drop submit."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, StorageDep
from api.presenters import base_url
from api.queries import batch_summary, get_batch, get_job
from api.web import views
from api.web.auth import WebUser, browser_nonce, resolve, secret_of
from api.web.render import page, render
from api.web.submit_form import param_fields
from api.web.tokens import csrf_token
from shared.settings import Settings
from shared.storage import Storage

router = APIRouter(prefix="/web", include_in_schema=False)
HOME = "/web/batches"


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this page only (never another site)."""
    if not target or not target.startswith("/web") or target.startswith("//") or "\\" in target:
        return HOME
    if any(ord(c) < 0x21 for c in target) or len(target) > 500:
        return HOME
    return target


def _linker(settings: Settings, storage: StorageDep) -> views.WebLinker:
    return views.WebLinker(None, settings, storage)


@router.get("")
def index() -> Response:
    return RedirectResponse(HOME, status_code=303)


@router.get("/login")
def login_page(
    request: Request, session: SessionDep, settings: SettingsDep, next: Annotated[str, Query()] = HOME
) -> Response:
    if settings.auth == "off" or resolve(request, session, settings, count=False) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    csrf = csrf_token(secret_of(request.app), browser_nonce(request), "")
    return render(request, settings, "login.html", {"csrf": csrf, "next": safe_next(next), "error": None})


@router.get("/batches")
def batches_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    def build(user: WebUser) -> Response:
        summaries, next_cursor = views.recent_batches(session, user.tenant.id, cursor)
        singles = views.single_jobs(session, user.tenant.id) if not cursor else []
        context = {
            "batches": [{**s, "shown_counts": views.counts_words(s["counts"])} for s in summaries],
            "next_cursor": next_cursor,
            "singles": views.cards(session, user.tenant.id, singles, _linker(settings, storage)),
        }
        return render(request, settings, "batches.html", context, user=user)

    return page(request, session, settings, build)


def _batch_context(
    session: Session, user: WebUser, batch_id: str, settings: Settings, storage: Storage
) -> dict[str, Any]:
    """A batch page's and its gallery's: the batch's summary and a card per job."""
    summary = batch_summary(session, get_batch(session, user.tenant.id, batch_id))
    jobs = views.batch_jobs(session, user.tenant.id, batch_id)
    return {"batch": summary, "cards": views.cards(session, user.tenant.id, jobs, _linker(settings, storage))}


@router.get("/batches/{batch_id}")
def batch_page(
    batch_id: str, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> Response:
    def build(user: WebUser) -> Response:
        context = _batch_context(session, user, batch_id, settings, storage)
        context.update(
            shown_counts=views.counts_words(context["batch"]["counts"]),
            api_base=base_url(settings),
            created=views.when(context["batch"]["created_at"]),
        )
        return render(request, settings, "batch.html", context, user=user)

    return page(request, session, settings, build)


@router.get("/batches/{batch_id}/gallery")
def gallery_page(
    batch_id: str, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> Response:
    def build(user: WebUser) -> Response:
        context = _batch_context(session, user, batch_id, settings, storage)
        return render(request, settings, "gallery.html", context, user=user)

    return page(request, session, settings, build)


@router.get("/jobs/{job_id}")
def job_page(
    job_id: str, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> Response:
    def build(user: WebUser) -> Response:
        job = get_job(session, user.tenant.id, job_id)
        (card,) = views.cards(session, user.tenant.id, [job], _linker(settings, storage))
        context = {
            "card": card,
            "job": card.job,
            "loss": views.loss_points(card.job, job.progress),
            "api_base": base_url(settings),
            "times": {
                "submitted": views.when(card.job.created_at),
                "started": views.when(card.job.started_at),
                "finished": views.when(card.job.finished_at),
            },
        }
        return render(request, settings, "job.html", context, user=user)

    return page(request, session, settings, build)


@router.get("/submit")
def submit_page(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    def build(user: WebUser) -> Response:
        context = {
            "fields": param_fields(settings),
            "uploads": views.uploads(session, user.tenant.id),
            "idempotency_key": str(uuid.uuid4()),  # one per form shown: a resend is answered, not re-run
            "limits": settings,
        }
        return render(request, settings, "submit.html", context, user=user)

    return page(request, session, settings, build)


__all__ = ["router", "safe_next"]
