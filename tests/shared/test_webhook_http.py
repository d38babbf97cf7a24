"""shared.webhook_http.post against real receivers on loopback (127.0.0.1, ::1): answers, redirects,
receivers that stall or drip, huge answers, refused connections, address pinning and TLS.

The receivers block on an Event the fixture sets at teardown; the dripping ones pace their bytes with
timed waits on that Event and give up after a few seconds, so that a post without a working deadline
fails its assertions instead of hanging the suite.
"""

from __future__ import annotations

import datetime
import http.server
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared import webhook_http
from shared.webhook_guard import Target
from shared.webhook_http import USER_AGENT, Response, post

TIMEOUT_S = 0.5
MARGIN_S = 1.5  # scheduling slack on a busy machine; far below what an unbounded read would take
DRIP_EVERY_S = 0.02
DRIP_GIVE_UP_S = 6.0


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, family: socket.AddressFamily) -> None:
        self.address_family = family
        self.seen: list[Seen] = []
        self.release = threading.Event()
        self.redirect_to = ""
        self.sni: list[str | None] = []
        super().__init__((host, 0), Handler)

    def server_bind(self) -> None:  # HTTPServer's would look up the host's name
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "receiver", int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up on a dripping or huge answer

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        route = self.path.partition("?")[0]
        if route == "/hang":
            self.server.release.wait(30)
        elif route == "/drip-headers":
            self.drip(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        elif route == "/drip-body":
            self.drip(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        elif route == "/huge":
            self.answer(200, b"x" * (8 * 1024 * 1024))
        elif route == "/fail":
            self.answer(500, b"oops")
        elif route == "/redirect":
            self.answer(302, b"", Location=self.server.redirect_to)
        else:
            self.answer(200, b"thanks")

    def answer(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def drip(self, head: bytes) -> None:
        self.wfile.write(head)
        give_up = time.monotonic() + DRIP_GIVE_UP_S
        while time.monotonic() < give_up and not self.server.release.wait(DRIP_EVERY_S):
            self.wfile.write(b"a")


def start(host: str = "127.0.0.1", family: socket.AddressFamily = socket.AF_INET) -> Receiver:
    receiver = Receiver(host, family)
    threading.Thread(target=receiver.serve_forever, args=(0.05,), name="receiver", daemon=True).start()
    return receiver


def stop(receiver: Receiver) -> None:
    receiver.release.set()
    receiver.shutdown()
    receiver.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = start()
    yield r
    stop(r)


@pytest.fixture
def other_receiver() -> Iterator[Receiver]:
    r = start()
    yield r
    stop(r)


def target(port: int, path: str = "/hook", *, host: str = "127.0.0.1", scheme: str = "http",
           addresses: tuple[str, ...] = ("127.0.0.1",)) -> Target:  # fmt: skip
    return Target(f"{scheme}://{host}:{port}{path}", scheme, host, port, path, addresses)


def send(to: Target, body: bytes = b'{"type": "job.completed"}', **kwargs: Any) -> Response:
    kwargs.setdefault("timeout_s", 5.0)
    kwargs.setdefault("max_response_bytes", 64 * 1024)
    return post(to, body, kwargs.pop("headers", {"webhook-id": "msg_1"}), **kwargs)


def test_a_200_with_its_body(receiver: Receiver) -> None:
    response = send(target(receiver.port, "/hook?tenant=t1"), b'{"a": 1}', headers={"webhook-id": "msg_1"})
    assert (response.status_code, response.error, response.body) == (200, None, b"thanks")
    assert response.latency_ms > 0
    [seen] = receiver.seen
    assert (seen.path, seen.body) == ("/hook?tenant=t1", b'{"a": 1}')
    assert seen.headers["user-agent"] == USER_AGENT == "stylequeue-webhooks/1"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["webhook-id"] == "msg_1"
    assert seen.headers["content-length"] == "8"


def test_a_given_content_type_is_kept(receiver: Receiver) -> None:
    send(target(receiver.port), headers={"Content-Type": "application/cloudevents+json"})
    assert receiver.seen[0].headers["content-type"] == "application/cloudevents+json"


@pytest.mark.parametrize("name", ["Host", "content-length", "Transfer-Encoding", "Connection", "User-Agent"])
def test_headers_post_sets_itself_are_refused(receiver: Receiver, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        send(target(receiver.port), headers={name: "x"})
    assert receiver.seen == []


def test_a_500_is_an_answer(receiver: Receiver) -> None:
    response = send(target(receiver.port, "/fail"))
    assert (response.status_code, response.error, response.body) == (500, None, b"oops")


def test_a_redirect_is_not_followed(receiver: Receiver, other_receiver: Receiver) -> None:
    receiver.redirect_to = f"http://127.0.0.1:{other_receiver.port}/elsewhere"
    response = send(target(receiver.port, "/redirect"))
    assert (response.status_code, response.error) == (302, "redirect not followed (302)")
    assert len(receiver.seen) == 1
    assert other_receiver.seen == []
    assert send(target(other_receiver.port, "/elsewhere")).status_code == 200  # it was reachable
    assert len(other_receiver.seen) == 1


def test_a_receiver_that_never_answers_times_out(receiver: Receiver) -> None:
    started = time.monotonic()
    response = send(target(receiver.port, "/hang"), timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert (response.status_code, response.error, response.body) == (None, "timeout", b"")
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + MARGIN_S
    assert len(receiver.seen) == 1  # the request did arrive


def test_slow_drip_headers_cannot_hold_the_deadline(receiver: Receiver) -> None:
    started = time.monotonic()
    response = send(target(receiver.port, "/drip-headers"), timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert (response.status_code, response.error) == (None, "timeout")
    assert elapsed < TIMEOUT_S + MARGIN_S


def test_a_slow_drip_body_cannot_hold_the_deadline(receiver: Receiver) -> None:
    started = time.monotonic()
    response = send(target(receiver.port, "/drip-body"), timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert (response.status_code, response.error) == (200, "timeout")  # began, did not finish
    assert 0 < len(response.body) < 100000 and response.body == b"a" * len(response.body)
    assert elapsed < TIMEOUT_S + MARGIN_S


@pytest.mark.parametrize("limit", [0, 1, 1000, 100_000])
def test_a_huge_answer_is_truncated_not_an_error(receiver: Receiver, limit: int) -> None:
    response = send(target(receiver.port, "/huge"), max_response_bytes=limit)
    assert (response.status_code, response.error, response.body) == (200, None, b"x" * limit)


def test_a_closed_port_is_connection_refused() -> None:
    with socket.socket() as reserved:  # bound, not listening: nothing else gets the port meanwhile
        reserved.bind(("127.0.0.1", 0))
        response = send(target(reserved.getsockname()[1]))
    assert (response.status_code, response.error, response.body) == (None, "connection refused", b"")


def test_a_receiver_that_takes_no_data_times_out_while_sending() -> None:
    with socket.socket() as stalled:  # listens, never accepts, never reads
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(1)
        started = time.monotonic()
        response = send(target(stalled.getsockname()[1]), b"x" * (64 * 1024 * 1024), timeout_s=TIMEOUT_S)
        elapsed = time.monotonic() - started
    assert (response.status_code, response.error) == (None, "timeout")
    assert elapsed < TIMEOUT_S + MARGIN_S


def test_the_connection_is_pinned_to_the_checked_address(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_dns(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a DNS lookup: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket, "gethostbyname", no_dns)
    response = send(target(receiver.port, "/p?q=1", host="example.invalid"))
    assert response.status_code == 200, response.error
    assert receiver.seen[0].headers["host"] == f"example.invalid:{receiver.port}"
    assert receiver.seen[0].path == "/p?q=1"


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_default_port_is_left_out_of_host(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    real_open = webhook_http._open  # port 80 cannot be bound here: connect to the receiver's instead
    monkeypatch.setattr(
        webhook_http, "_open", lambda address, port, timeout: real_open(address, receiver.port, timeout)
    )
    monkeypatch.setattr(webhook_http, "_wrap_tls", lambda sock, *args: sock)  # https, minus the TLS
    port = 80 if scheme == "http" else 443
    response = send(
        Target(f"{scheme}://example.invalid/", scheme, "example.invalid", port, "/", ("127.0.0.1",))
    )
    assert response.status_code == 200, response.error
    assert receiver.seen[0].headers["host"] == "example.invalid"


def test_the_first_address_that_connects_is_used(receiver: Receiver) -> None:
    # ::1 is not listening on the receiver's port (the receiver has IPv4 only): refused, or unreachable
    response = send(target(receiver.port, addresses=("::1", "127.0.0.1")))
    assert response.status_code == 200, response.error
    assert len(receiver.seen) == 1


def test_an_address_that_never_connects_gets_only_its_share_of_the_time(receiver: Receiver) -> None:
    """Two addresses: a black hole (SYNs dropped) first may use half the time, not all of it."""
    try:
        hole = socket.socket(socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 here: {exc}")
    try:
        hole.bind(("::1", receiver.port))  # the receiver's port number, on the other loopback
    except OSError as exc:
        hole.close()
        pytest.skip(f"no IPv6 loopback, or its port is taken: {exc}")
    with hole, socket.socket(socket.AF_INET6) as filler, socket.socket(socket.AF_INET6) as probe:
        hole.listen(0)
        filler.connect(("::1", receiver.port))  # fills the accept queue: later SYNs are dropped
        probe.settimeout(0.2)
        try:
            probe.connect(("::1", receiver.port))
        except TimeoutError:
            pass
        else:
            pytest.skip("this kernel does not drop connections beyond the accept queue")
        started = time.monotonic()
        response = send(target(receiver.port, addresses=("::1", "127.0.0.1")), timeout_s=2 * TIMEOUT_S)
        elapsed = time.monotonic() - started
    assert response.status_code == 200, response.error
    assert TIMEOUT_S * 0.9 <= elapsed < 2 * TIMEOUT_S


def test_the_deadline_refuses_to_start_anything_once_spent() -> None:
    # what stops a receiver whose bytes always arrive before the time left runs out
    deadline = webhook_http._Deadline(time.monotonic() + 60)
    assert 59 < deadline.left() <= 60
    with pytest.raises(TimeoutError):
        webhook_http._Deadline(time.monotonic()).left()


def test_when_no_address_connects_the_last_failure_is_reported() -> None:
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        response = send(target(reserved.getsockname()[1], addresses=("127.0.0.1", "127.0.0.1")))
    assert (response.status_code, response.error) == (None, "connection refused")
    response = send(target(1, addresses=()))
    assert response.status_code is None and response.error is not None


def test_ipv6_loopback() -> None:
    try:
        receiver = start("::1", socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        response = send(target(receiver.port, host="::1", addresses=("::1",)))
        assert (response.status_code, response.body) == (200, b"thanks")
        assert receiver.seen[0].headers["host"] == f"[::1]:{receiver.port}"
    finally:
        stop(receiver)


# --- TLS, with a self-signed certificate for hooks.test ---


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hooks.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("hooks.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture
def tls_receiver(certificate: tuple[Path, Path]) -> Iterator[Receiver]:
    receiver = Receiver("127.0.0.1", socket.AF_INET)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    context.sni_callback = lambda sock, server_name, ctx: receiver.sni.append(server_name)
    receiver.socket = context.wrap_socket(receiver.socket, server_side=True)
    threading.Thread(target=receiver.serve_forever, args=(0.05,), name="tls-receiver", daemon=True).start()
    yield receiver
    stop(receiver)


def trusting(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


def test_tls_with_sni_and_a_verified_certificate(
    tls_receiver: Receiver, certificate: tuple[Path, Path]
) -> None:
    to = target(tls_receiver.port, host="hooks.test", scheme="https")
    response = send(to, ssl_context=trusting(certificate))
    assert (response.status_code, response.error, response.body) == (200, None, b"thanks")
    assert tls_receiver.sni == ["hooks.test"]
    assert tls_receiver.seen[0].headers["host"] == f"hooks.test:{tls_receiver.port}"


def test_tls_refuses_a_certificate_for_another_host(
    tls_receiver: Receiver, certificate: tuple[Path, Path]
) -> None:
    response = send(
        target(tls_receiver.port, host="other.test", scheme="https"), ssl_context=trusting(certificate)
    )
    assert response.status_code is None
    assert response.error is not None and response.error.startswith("tls: certificate verify failed")
    assert "other.test" in response.error
    assert tls_receiver.sni == ["other.test"] and tls_receiver.seen == []


def test_tls_refuses_an_untrusted_certificate_by_default(tls_receiver: Receiver) -> None:
    response = send(target(tls_receiver.port, host="hooks.test", scheme="https"))
    assert response.status_code is None
    assert response.error is not None and response.error.startswith("tls: certificate verify failed")
    assert tls_receiver.seen == []


def test_a_tls_handshake_that_never_comes_times_out(certificate: tuple[Path, Path]) -> None:
    with socket.socket() as silent:  # accepts TCP (the backlog), never speaks TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        started = time.monotonic()
        to = target(silent.getsockname()[1], host="hooks.test", scheme="https")
        response = send(to, timeout_s=TIMEOUT_S, ssl_context=trusting(certificate))
        elapsed = time.monotonic() - started
    assert (response.status_code, response.error) == (None, "timeout")
    assert elapsed < TIMEOUT_S + MARGIN_S


def test_plain_http_to_a_tls_receiver_is_an_error_not_an_exception(tls_receiver: Receiver) -> None:
    response = send(target(tls_receiver.port), timeout_s=TIMEOUT_S)
    assert response.status_code is None and response.error is not None
