"""``Idempotency-Key`` on submissions (the storage rules are in ``shared.idempotency``).

The request is fingerprinted as it arrived (path, every form field name and value and each file's
sha256, in order; or the canonical JSON body) and looked up before any validation: a known key with
the same fingerprint replays the first answer and creates nothing. Otherwise the key row is added to
the transaction that creates the jobs (``commit_submission``); if a concurrent request with the same
key committed first, the unique constraint fails our flush, everything is rolled back and the
winner's answer is replayed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import FormData, UploadFile

from api.commit_recovery import InDoubt, Submission
from api.offload import off_loop
from shared import logs
from shared.db import is_db_outage
from shared.idempotency import StoredResponse, check_key, fingerprint, lookup, remember

if TYPE_CHECKING:  # api.deps imports IdemRequest from here
    from api.deps import SubmitCtx

logger = logging.getLogger(__name__)

KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class IdemRequest:
    key: str
    request_hash: str


def header_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` (400 when empty or too long), None without one."""
    raw = request.headers.get(KEY_HEADER)
    return None if raw is None else check_key(raw)


def _file_digest(upload: UploadFile) -> str:
    """sha256 of an uploaded file (blocking reads: called in a worker thread)."""
    digest = hashlib.sha256()
    upload.file.seek(0)
    while chunk := upload.file.read(_CHUNK):
        digest.update(chunk)
    upload.file.seek(0)
    return digest.hexdigest()


def _form_fingerprint(method: str, path: str, form: FormData) -> str:
    parts: list[bytes | str] = [method, path, "multipart"]
    for name, value in form.multi_items():
        if isinstance(value, str):
            parts += ["field", name, value]
        else:
            parts += ["file", name, _file_digest(value)]
    return fingerprint(parts)


async def form_request(request: Request, form: FormData, key: str | None) -> IdemRequest | None:
    """The key and the fingerprint of a multipart request (files hashed off the event loop)."""
    if key is None:
        return None
    return IdemRequest(
        key, await off_loop(request, _form_fingerprint, request.method, request.url.path, form)
    )


def json_request(method: str, path: str, body: Any, key: str | None) -> IdemRequest | None:
    """The key and the fingerprint of a parsed JSON body (CPU-bound for large bodies: call it off
    the event loop)."""
    if key is None:
        return None
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return IdemRequest(key, fingerprint([method, path, "json", canonical]))


def find_stored(
    sessions: sessionmaker[Session], indoubt: InDoubt, tenant_id: str, idem: IdemRequest
) -> StoredResponse | None:
    """The first answer for this key (422 if it came with another body), None if the key is new."""
    if indoubt.pending():
        indoubt.resolve()  # an in-doubt commit of this key must not be replayed as a success
    with sessions() as session:
        # An expired key is not deleted here: a request rejected later must change nothing; the
        # submission's own transaction replaces it (shared.idempotency.remember).
        stored = lookup(session, tenant_id, idem.key, idem.request_hash, drop_expired=False)
        session.rollback()
    if stored is not None:
        logs.event(logger, "idempotent_replay", kind="request", tenant_id=tenant_id)
    return stored


async def replay(ctx: SubmitCtx) -> JSONResponse | None:
    """The stored first answer for a repeated ``Idempotency-Key`` (``ctx.idem``), or None when
    there is no key or it is new."""
    if ctx.idem is None:
        return None
    stored = await run_in_threadpool(find_stored, ctx.sessions, ctx.indoubt, ctx.tenant.id, ctx.idem)
    return None if stored is None else respond(stored, replayed=True)


def respond(stored: StoredResponse, *, replayed: bool) -> JSONResponse:
    headers = {REPLAYED_HEADER: "true"} if replayed else None
    return JSONResponse(stored.body, stored.status_code, headers=headers)


def commit_submission(
    session: Session, sub: Submission, idem: IdemRequest | None, response: StoredResponse, indoubt: InDoubt
) -> StoredResponse | None:
    """Commit the submission's rows together with its key row.

    Returns None when committed, or the winner's answer when a concurrent request with the same key
    committed first (all of ours rolled back). A connection lost during the COMMIT itself leaves
    the outcome unknown: the submission is handed to ``indoubt`` and the error re-raised (503).
    """
    if idem is not None:
        remember(session, sub.tenant_id, idem.key, idem.request_hash, response)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        if idem is None:
            raise
        stored = lookup(session, sub.tenant_id, idem.key, idem.request_hash)
        session.rollback()
        if stored is None:
            raise
        logs.event(logger, "idempotent_race_lost", kind="request", tenant_id=sub.tenant_id)
        return stored
    try:
        session.commit()
    except Exception as exc:
        if is_db_outage(exc):
            indoubt.add(sub)
        raise
    return None


__all__ = [
    "KEY_HEADER",
    "REPLAYED_HEADER",
    "IdemRequest",
    "commit_submission",
    "find_stored",
    "form_request",
    "header_key",
    "json_request",
    "replay",
    "respond",
]
