"""A real webhook receiver on loopback for the tests and bench/webhooks.py: it verifies every
delivery's Standard Webhooks signature with the ``standardwebhooks`` library (the same one the
sender signs with, as a tenant's receiver would), records it, and answers as scripted (a status, or
a hang until released: a timeout for the sender)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

HANG = -1  # a scripted answer: hold the request until ``release`` (the sender times out)


@dataclass(frozen=True)
class Delivery:
    id: str
    event: str
    body: dict[str, Any]
    raw: bytes
    verified: bool
    at: float  # time.monotonic() when it arrived
    answered: int  # what the receiver answered (HANG: nothing)
    headers: dict[str, str]  # lower-case names
    wall: float  # time.time() when it arrived (to compare with database times)


@dataclass
class Receiver:
    secret: Callable[[], str]  # the tenant's current secret (read when a delivery arrives)
    script: list[int] = field(default_factory=list)  # answers for the first deliveries, then 200
    deliveries: list[Delivery] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Condition = field(default_factory=threading.Condition)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                receiver.handle(self, raw)

            def log_message(self, *_args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def handle(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        try:
            Webhook(self.secret()).verify(raw, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        with self.arrived:
            answer = self.script.pop(0) if self.script else 200
            self.deliveries.append(
                Delivery(
                    headers.get("webhook-id", ""),
                    headers.get("stylequeue-event", ""),
                    json.loads(raw or b"{}"),
                    raw,
                    verified,
                    time.monotonic(),
                    answer,
                    headers,
                    time.time(),
                )
            )
            self.arrived.notify_all()
        if answer == HANG:
            self.released.wait()
            return
        handler.send_response(answer)
        handler.send_header("content-length", "2")
        handler.end_headers()
        handler.wfile.write(b"ok")

    def wait_for(self, done: Callable[[list[Delivery]], bool], timeout_s: float) -> list[Delivery]:
        """Wait (on arrivals, not on time) until ``done(deliveries)``; the deliveries so far."""
        deadline = time.monotonic() + timeout_s
        with self.arrived:
            while not done(self.deliveries):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"receiver: not done after {timeout_s}s: {self.summary()}")
                self.arrived.wait(left)
            return list(self.deliveries)

    def summary(self) -> str:
        return ", ".join(f"{d.event}:{d.id[-6:]}:{d.answered}" for d in self.deliveries) or "nothing"

    def stop(self) -> None:
        self.released.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


__all__ = ["HANG", "Delivery", "Receiver"]
