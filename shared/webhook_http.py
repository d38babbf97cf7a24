"""One webhook delivery attempt: an HTTP POST over a connection pinned to the checked addresses.

``shared.webhook_guard.check_url`` resolved the tenant's host and checked every address; ``post`` connects
to those addresses only (no second lookup, so a DNS answer that changes meanwhile gains nothing), sends
``Host`` and, for https, SNI and certificate verification for the host the tenant named.

One deadline covers the whole attempt. Socket timeouts alone do not bound it (each recv would get a full
timeout, and a receiver dripping a byte at a time would hold the worker for ever), so every connect, send,
handshake and recv is given the time left, and none starts once it is spent. http.client parses the
answer, over a socket stand-in whose reads and writes keep to that deadline.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from shared.webhook_guard import Target

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

logger = logging.getLogger(__name__)

USER_AGENT = "stylequeue-webhooks/1"
_READ_CHUNK = 16 * 1024
_DEFAULT_PORTS = {"https": 443, "http": 80}
# set by post itself: a caller's would contradict the request actually sent
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "user-agent"})


@dataclass(frozen=True)
class Response:
    """The outcome of one attempt."""

    status_code: int | None  # None when no HTTP answer came (connect error, timeout, TLS error)
    latency_ms: float
    error: str | None  # a short reason ("timeout", "connection refused", "redirect not followed (302)")
    body: bytes  # at most max_response_bytes


def post(
    target: Target,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    max_response_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
) -> Response:
    """POST body to target, connecting only to target.addresses (in order, first that connects), sending
    Host: <host[:port]> and, for https, SNI + certificate verification against target.host. An overall
    deadline of timeout_s covers connect, send and reading the answer (a slow-drip receiver cannot hold it
    longer). Never follows redirects (a 3xx is returned with error 'redirect not followed (3xx)'). Reads at
    most max_response_bytes of the answer body (more is dropped, not an error). Never raises for network
    problems (returns Response with error); a status code with an error means the answer began but
    did not finish (the body is what arrived). ValueError for headers post sets itself (Host,
    Content-Length, Transfer-Encoding, Connection, User-Agent) or a header value http.client refuses."""
    own = sorted(name for name in headers if name.lower() in _OWN_HEADERS)
    if own:
        raise ValueError(f"webhook_http.post sets these headers itself: {', '.join(own)}")
    started = time.monotonic()
    deadline = _Deadline(started + timeout_s)
    status: int | None = None
    received = bytearray()
    error: str | None = None
    sock: socket.socket | None = None
    try:
        sock = _connect(target, deadline, ssl_context)
        answer = _request(_PinnedConnection(target, _DeadlineSocket(sock, deadline)), target, body, headers)
        status = answer.status
        _read_body(answer, received, max_response_bytes)
    except (OSError, http.client.HTTPException) as exc:
        error = _describe(exc)
    finally:
        if sock is not None:
            sock.close()
    if error is None and status is not None and 300 <= status < 400:
        error = f"redirect not followed ({status})"
    latency_ms = (time.monotonic() - started) * 1000.0
    logger.debug(
        "webhook POST to %s:%s: %s %s in %.0f ms", target.host, target.port, status, error, latency_ms
    )
    return Response(status, latency_ms, error, bytes(received))


class _Deadline:
    def __init__(self, at: float) -> None:
        self.at = at  # time.monotonic()

    def left(self) -> float:
        """Seconds left; TimeoutError when none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("webhook delivery deadline passed")
        return left


class _DeadlineReader(io.RawIOBase):
    """A socket's receiving side where every recv waits at most the time left."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        self._sock.settimeout(self._deadline.left())
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """What http.client uses of a socket (sendall, makefile, close), each operation within the deadline."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            self._sock.settimeout(self._deadline.left())
            view = view[self._sock.send(view) :]

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        """Nothing: http.client closes its socket before the body is read; post closes the real one."""


class _PinnedConnection(http.client.HTTPConnection):
    """http.client over a socket already connected to a checked address: it never opens one itself."""

    def __init__(self, target: Target, sock: _DeadlineSocket) -> None:
        super().__init__(target.host, target.port)
        self.sock = cast(socket.socket, sock)

    def connect(self) -> None:
        raise http.client.NotConnected("a pinned webhook connection does not reconnect")


def _connect(target: Target, deadline: _Deadline, ssl_context: ssl.SSLContext | None) -> socket.socket:
    """A socket to the first of target.addresses that accepts (each try gets its share of the time
    left), TLS-wrapped for https."""
    failure: OSError | None = None
    for tried, address in enumerate(target.addresses):
        try:
            sock = _open(address, target.port, deadline.left() / (len(target.addresses) - tried))
        except OSError as exc:
            failure = exc
            continue
        if target.scheme != "https":
            return sock
        return _wrap_tls(sock, target.host, deadline, ssl_context)
    raise failure if failure is not None else OSError("the target has no address")


def _open(address: str, port: int, timeout: float) -> socket.socket:
    try:
        ip = ipaddress.ip_address(address)  # a literal address: no lookup can happen
    except ValueError as exc:
        raise OSError(f"not an IP address: {address!r}") from exc
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((str(ip), port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _wrap_tls(
    sock: socket.socket, host: str, deadline: _Deadline, ssl_context: ssl.SSLContext | None
) -> ssl.SSLSocket:
    context = ssl_context if ssl_context is not None else ssl.create_default_context()
    try:
        tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        tls.settimeout(deadline.left())  # the whole handshake, not each of its reads
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls


def _request(
    conn: _PinnedConnection, target: Target, body: bytes, headers: Mapping[str, str]
) -> http.client.HTTPResponse:
    conn.putrequest("POST", target.path, skip_host=True, skip_accept_encoding=True)
    host = f"[{target.host}]" if ":" in target.host else target.host
    if target.port != _DEFAULT_PORTS.get(target.scheme):
        host = f"{host}:{target.port}"
    conn.putheader("Host", host)
    conn.putheader("User-Agent", USER_AGENT)
    if not any(name.lower() == "content-type" for name in headers):
        conn.putheader("Content-Type", "application/json")
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.putheader("Content-Length", str(len(body)))
    conn.putheader("Connection", "close")
    conn.endheaders(body)
    return conn.getresponse()


def _read_body(answer: http.client.HTTPResponse, into: bytearray, limit: int) -> None:
    """Up to limit bytes of the body into ``into`` (kept when reading fails half way)."""
    while len(into) < limit:
        chunk = answer.read1(min(_READ_CHUNK, limit - len(into)))  # one recv: keeps what came
        if not chunk:
            return
        into += chunk


def _describe(exc: OSError | http.client.HTTPException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"tls: certificate verify failed ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"tls: {exc.reason or type(exc).__name__}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected):  # also a ConnectionResetError
        return "connection closed without an answer"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, http.client.HTTPException):
        return f"bad answer ({type(exc).__name__})"
    return f"network error ({exc.strerror or type(exc).__name__})"
