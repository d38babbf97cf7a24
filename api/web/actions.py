"""The page's POST routes: sign in and out, cancel and delete (plain forms, each with its CSRF token),
and submit, which runs the API's own submission path (``api.submission.submit`` with the route of
``POST /v1/batches``) for the signed-in tenant once the CSRF header is checked; and the work estimate
(GET, JSON) the submit form shows."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse

from api.deps import PublisherDep, SessionDep, SettingsDep, StorageDep, SubmitCtx
from api.presenters import Linker
from api.queries import get_job
from api.routes.batches import SUBMIT_BATCH, cancel_batch, delete_batch
from api.routes.jobs import cancel_job, delete_job
from api.submission import submit
from api.web.auth import (
    CSRF_COOKIE,
    CSRF_HEADER,
    SESSION_COOKIE,
    WebUser,
    browser_nonce,
    check_csrf,
    check_same_origin,
    resolve,
    secret_of,
    set_cookie,
    sign_in,
    sign_out,
    signed_out,
)
from api.web.pages import safe_next
from api.web.render import action, error_page, render
from api.web.submit_form import estimate
from api.web.tokens import csrf_matches, csrf_token
from shared.db import get_sessionmaker
from shared.errors import Conflict, DomainError, Forbidden
from shared.settings import Settings

router = APIRouter(prefix="/web", include_in_schema=False)
CsrfField = Annotated[str, Form(alias="csrf_token", max_length=100)]
BackField = Annotated[str, Form(alias="back", max_length=500)]


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=500)] = "",
    csrf: CsrfField = "",
    next_page: Annotated[str, Form(alias="next", max_length=500)] = "",
) -> Response:
    target = safe_next(next_page)
    if settings.auth == "off":
        return RedirectResponse(target, status_code=303)
    try:
        check_same_origin(request, settings)
        if not csrf_matches(secret_of(request.app), request.cookies.get(CSRF_COOKIE), "", csrf):
            raise Forbidden("csrf_failed", "the sign-in form is out of date: try again")
        value, max_age = sign_in(request, session, settings, api_key)
    except DomainError as exc:
        fresh = csrf_token(secret_of(request.app), browser_nonce(request), "")
        context = {"csrf": fresh, "next": target, "error": exc.message}
        return render(request, settings, "login.html", context, status=exc.status)
    response = RedirectResponse(target, status_code=303)
    set_cookie(response, request, settings, SESSION_COOKIE, value, max_age=max_age)
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep, settings: SettingsDep, csrf: CsrfField = "") -> Response:
    """Signing out needs the form's token while the session is valid (no other site signs you out),
    and ends that session for every copy of its cookie (``api.web.auth.end_session``)."""
    user = resolve(request, session, settings, count=False) if settings.auth == "on" else None
    if user is not None:
        try:
            check_csrf(request, settings, user, csrf)
        except DomainError as exc:
            return error_page(request, settings, exc, user)
    response = RedirectResponse("/web/login?notice=signed_out", status_code=303)
    sign_out(response, request, settings, session, user)
    return response


def _back(back: str, default: str, notice: str) -> str:
    target = safe_next(back) if back else default
    return f"{target.split('?', 1)[0]}?notice={notice}"


@router.post("/jobs/{job_id}/cancel")
def cancel_job_form(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    csrf: CsrfField = "",
    back: BackField = "",
) -> Response:
    def run(user: WebUser) -> str:
        default = f"/web/jobs/{get_job(session, user.tenant.id, job_id).id}"
        try:
            out = cancel_job(job_id, request, Response(), session, settings, storage, user.tenant)
        except Conflict:
            return _back(back, default, "already_finished")
        return _back(back, default, "cancel_requested" if out.status == "running" else "canceled")

    return action(request, session, settings, csrf, run)


@router.post("/jobs/{job_id}/delete")
def delete_job_form(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    csrf: CsrfField = "",
) -> Response:
    def run(user: WebUser) -> str:
        job = get_job(session, user.tenant.id, job_id)
        batch_id = job.batch_id
        done = delete_job(job_id, session, storage, user.tenant)
        notice = "job_deleted" if done.status_code == 204 else "job_deleting"
        return _back("", f"/web/batches/{batch_id}" if batch_id else "/web/batches", notice)

    return action(request, session, settings, csrf, run)


@router.post("/batches/{batch_id}/cancel")
def cancel_batch_form(
    batch_id: str, request: Request, session: SessionDep, settings: SettingsDep, csrf: CsrfField = ""
) -> Response:
    def run(user: WebUser) -> str:
        cancel_batch(batch_id, session, user.tenant)
        return _back("", f"/web/batches/{batch_id}", "batch_canceled")

    return action(request, session, settings, csrf, run)


@router.post("/batches/{batch_id}/delete")
def delete_batch_form(
    batch_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    csrf: CsrfField = "",
) -> Response:
    def run(user: WebUser) -> str:
        delete_batch(batch_id, session, storage, user.tenant)
        return _back("", "/web/batches", "batch_deleted")

    return action(request, session, settings, csrf, run)


def _submitter(request: Request, settings: Settings) -> WebUser:
    with get_sessionmaker(settings.database_url)() as session:
        user = resolve(request, session, settings)
    if user is None:
        raise signed_out()
    return user


@router.post("/batches")
async def submit_batch_form(
    request: Request, settings: SettingsDep, storage: StorageDep, publisher: PublisherDep
) -> Response:
    """``POST /v1/batches`` for the page's script: the same form fields, ``Idempotency-Key`` and answer;
    signed in by the session, with its ``X-CSRF-Token``; all checked before the body is read."""
    check_same_origin(request, settings)
    user = await run_in_threadpool(_submitter, request, settings)
    check_csrf(request, settings, user, request.headers.get(CSRF_HEADER))
    ctx = SubmitCtx(
        settings,
        get_sessionmaker(settings.database_url),
        storage,
        publisher,
        user.tenant,
        Linker(request, settings, storage),
        request.app.state.indoubt,
    )
    return await submit(request, ctx, SUBMIT_BATCH)


@router.get("/estimate")
def estimate_work(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    contents: Annotated[int, Query(ge=0, le=100_000)] = 0,
    styles: Annotated[int, Query(ge=0, le=100_000)] = 0,
    mode: Annotated[str, Query(max_length=16)] = "product",
    pairs: Annotated[str | None, Query(max_length=64 * 1024)] = None,
    params: Annotated[str | None, Query(max_length=64 * 1024)] = None,
) -> Response:
    """What a submit of this shape would create (jobs, scales, work, the daily budget), or its error."""
    user = resolve(request, session, settings)
    if user is None:
        raise signed_out()
    found = estimate(
        session,
        user.tenant.id,
        settings,
        contents=contents,
        styles=styles,
        mode=mode,
        pairs=pairs,
        params=params,
    )
    return JSONResponse(found)


__all__ = ["router"]
