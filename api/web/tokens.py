"""The page's signed tokens: the session cookie and the CSRF token, and the secret that signs both.

A session token is ``<payload>.<mac>`` (base64url): the payload names an API key's row (its id, the
tenant's id, the key's prefix for the audit log), when the session ends, and a random session id;
the MAC is HMAC-SHA256 under the web secret. It never holds the API key itself, and a client cannot
forge or extend one without the secret. The CSRF token is the HMAC of the ``sq_csrf`` cookie's random
nonce and the session id: a form (or the page's script) proves it was served by us to this browser.

The secret is ``STYLEQUEUE_WEB_SECRET``, else a random one made once under ``data_dir`` (mode 0600,
created with O_EXCL, so processes sharing the folder agree on it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from shared import logs
from shared.settings import Settings

logger = logging.getLogger(__name__)

VERSION = 1
MAX_TOKEN = 600  # characters; ours are about 200
SECRET_FILE = "web_secret"
_NONCE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
_SESSION_CONTEXT = b"stylequeue-web-session\0"
_CSRF_CONTEXT = b"stylequeue-web-csrf\0"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_nonce() -> str:
    return secrets.token_urlsafe(32)


def is_nonce(value: str | None) -> bool:
    return value is not None and _NONCE.fullmatch(value) is not None


@dataclass(frozen=True)
class SessionToken:
    key_id: str  # the API key's row (api_keys.id), not the key
    tenant_id: str
    prefix: str  # the key's prefix: the audit log names it
    expires: int  # unix seconds
    sid: str  # random: what the CSRF token is bound to


def sign(secret: bytes, token: SessionToken) -> str:
    fields = [VERSION, token.key_id, token.tenant_id, token.prefix, token.expires, token.sid]
    body = _b64(json.dumps(fields, separators=(",", ":")).encode())
    mac = hmac.new(secret, _SESSION_CONTEXT + body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def verify(secret: bytes, raw: str | None, now: float) -> SessionToken | None:
    """The token ``raw`` holds if we signed it and it has not expired, else None."""
    if not raw or len(raw) > MAX_TOKEN or raw.count(".") != 1:
        return None
    body, mac = raw.split(".")
    expected = hmac.new(secret, _SESSION_CONTEXT + body.encode(), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(_unb64(mac), expected):
            return None
        fields = json.loads(_unb64(body))
    except (binascii.Error, ValueError):
        return None
    if not (isinstance(fields, list) and len(fields) == 6 and fields[0] == VERSION):
        return None
    _, key_id, tenant_id, prefix, expires, sid = fields
    if not all(isinstance(v, str) for v in (key_id, tenant_id, prefix, sid)) or not isinstance(expires, int):
        return None
    if expires <= now:
        return None
    return SessionToken(key_id, tenant_id, prefix, expires, sid)


def csrf_token(secret: bytes, nonce: str, sid: str) -> str:
    """The token the page's forms carry: bound to this browser's nonce and to its session (if any)."""
    message = _CSRF_CONTEXT + nonce.encode() + b"\0" + sid.encode()
    return _b64(hmac.new(secret, message, hashlib.sha256).digest())


def csrf_matches(secret: bytes, nonce: str | None, sid: str, given: str | None) -> bool:
    if not is_nonce(nonce) or not given or len(given) > 100:
        return False
    assert nonce is not None
    return hmac.compare_digest(csrf_token(secret, nonce, sid).encode(), given.encode())


def _read_or_create(path: Path) -> bytes:
    """The secret in ``path``, made (O_EXCL, 0600) by whichever process gets there first."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(100):  # another process made it a moment ago and is writing it
            value = path.read_bytes().strip()
            if len(value) >= 32:
                return value
            time.sleep(0.01)
        raise RuntimeError(f"{path} holds no secret: delete it, or set STYLEQUEUE_WEB_SECRET") from None
    value = secrets.token_urlsafe(48).encode()
    with os.fdopen(fd, "wb") as fh:
        fh.write(value + b"\n")
    logs.event(logger, "web_secret_created", kind="api", path=str(path))
    return value


def load_secret(settings: Settings) -> bytes:
    """The web secret's HMAC key: the setting, else the one kept under ``data_dir``."""
    if settings.web_secret:
        raw = settings.web_secret.encode()
    else:
        folder = settings.data_dir.expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        raw = _read_or_create(folder / SECRET_FILE)
    return hashlib.sha256(b"stylequeue-web\0" + raw).digest()


__all__ = [
    "SessionToken",
    "csrf_matches",
    "csrf_token",
    "is_nonce",
    "load_secret",
    "new_nonce",
    "sign",
    "verify",
]
