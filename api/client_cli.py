"""The client commands: ``stylequeue submit``, ``status`` and ``webhook-secret``, over HTTP (``api.client``).

httpx and tqdm are imported by the handlers, so ``stylequeue --help`` stays fast. What they print is
for a terminal: no log line per request (httpx logs each at INFO; ``-v`` shows them), no presigned
storage URL, and an API that cannot be reached is one line naming its URL, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.client_wait import wait
from shared.jobs import JobStatus
from shared.storage_keys import result_extension

if TYPE_CHECKING:
    from api.client import StyleQueueClient

Handler = Callable[[argparse.Namespace], int]

SUMMARY = {
    "submit": "submit contents x styles over HTTP",
    "status": "show a job or a batch",
    "webhook-secret": "show (or --rotate) your webhook signing secret",
}


def register(subparsers: Any, names: Iterable[str] | None = None) -> None:
    """Add the client commands (or those in ``names``) to an argparse subparsers object."""
    adders = {"submit": _add_submit, "status": _add_status, "webhook-secret": _add_webhook_secret}
    for name in SUMMARY if names is None else names:
        adders[name](subparsers)


def _add_submit(sub: Any) -> None:
    p = sub.add_parser("submit", help=SUMMARY["submit"])
    p.add_argument("contents", nargs="+", metavar="CONTENT", help="content image files")
    p.add_argument("--style", action="append", required=True, help="style image (repeatable)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="engine parameter, V parsed as JSON when it can be (repeatable)",
    )
    p.add_argument(
        "--mode",
        choices=["product", "pairs"],
        default="product",
        help="product: every content x every style; pairs: content i with style i",
    )
    p.add_argument("--wait", action="store_true", help="show progress, then download results")
    p.add_argument("-o", "--output", default="stylequeue-out", help="folder for results")
    p.add_argument("--webhook", metavar="URL", help="an https URL to POST the batch's signed events to")
    p.add_argument(
        "--webhook-events",
        metavar="E1,E2",
        help="start, checkpoint, completed, batch.completed (default: completed,batch.completed)",
    )
    _client_args(p)
    p.set_defaults(func=cmd_submit)


def _add_webhook_secret(sub: Any) -> None:
    p = sub.add_parser("webhook-secret", help=SUMMARY["webhook-secret"])
    p.add_argument("--rotate", action="store_true", help="make a new one (the old one signs for a while)")
    _client_args(p)
    p.set_defaults(func=cmd_webhook_secret)


def _add_status(sub: Any) -> None:
    p = sub.add_parser("status", help=SUMMARY["status"])
    p.add_argument("id", metavar="JOB_OR_BATCH")
    _client_args(p)
    p.set_defaults(func=cmd_status)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("STYLEQUEUE_URL", "http://127.0.0.1:8000"),
        help="API base URL (env STYLEQUEUE_URL)",
    )
    p.add_argument(
        "--key", default=os.environ.get("STYLEQUEUE_API_KEY"), help="API key (env STYLEQUEUE_API_KEY)"
    )


def parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param expects K=V, got {item!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def client_command(handler: Handler) -> Handler:
    """A client command's handler, quiet and with one line for an API it cannot reach: httpx's
    per-request INFO lines are off (unless ``-v``), and a connection failure or an answer left
    unhandled is printed as ``stylequeue: ...`` with exit status 1, never a traceback."""

    @wraps(handler)
    def run(args: argparse.Namespace) -> int:
        import httpx

        from api.client import ApiError

        if not getattr(args, "verbose", False):
            for name in ("httpx", "httpcore"):
                logging.getLogger(name).setLevel(logging.WARNING)
        try:
            return handler(args)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            print(
                f"stylequeue: cannot reach the API at {args.url} ({unreachable_reason(exc)})", file=sys.stderr
            )
        except ApiError as exc:
            print(f"stylequeue: {exc}", file=sys.stderr)
        return 1

    return run


def unreachable_reason(exc: Exception) -> str:
    """A connection failure in a few words: ``connection refused``, ``timed out``, ..."""
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    text = text or type(exc).__name__
    return text[:1].lower() + text[1:]


@client_command
def cmd_submit(args: argparse.Namespace) -> int:
    return submit(args, parse_params(args.param))


@client_command
def cmd_status(args: argparse.Namespace) -> int:
    return status(args)


@client_command
def cmd_webhook_secret(args: argparse.Namespace) -> int:
    from api.client import ApiError, StyleQueueClient

    with StyleQueueClient(args.url, args.key) as client:
        try:
            got = client.webhook_secret(rotate=args.rotate)
        except ApiError as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 1
    if got.get("previous_valid_until"):
        print(f"the previous secret also signs until {got['previous_valid_until']}")
    print(got["secret"])
    return 0


def _events_list(raw: str | None) -> list[str] | None:
    return None if raw is None else [e.strip() for e in raw.split(",") if e.strip()]


def _plan_names(contents: list[Path], styles: list[Path], mode: str) -> list[str]:
    if mode == "pairs":
        return [f"{c.stem}__{s.stem}" for c, s in zip(contents, styles, strict=True)]
    return [f"{c.stem}__{s.stem}" for c in contents for s in styles]


def submit(args: argparse.Namespace, params: dict[str, Any]) -> int:
    from api.client import ApiError, StyleQueueClient

    contents = [Path(p) for p in args.contents]
    styles = [Path(p) for p in args.style]
    if args.mode == "pairs" and len(contents) != len(styles):
        print("--mode pairs needs as many --style as contents", file=sys.stderr)
        return 2
    missing = [str(p) for p in contents + styles if not p.is_file()]
    if missing:
        print(f"no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    with StyleQueueClient(args.url, args.key) as client:
        try:
            ids = {p: client.upload_path(p) for p in dict.fromkeys(contents + styles)}
            pairs = [[i, i] for i in range(len(contents))] if args.mode == "pairs" else None
            batch = client.submit_batch(
                [ids[p] for p in contents],
                [ids[p] for p in styles],
                mode=args.mode,
                pairs=pairs,
                params=params,
                webhook=args.webhook,
                webhook_events=_events_list(args.webhook_events),
            )
        except ApiError as exc:
            print(f"rejected: {exc}", file=sys.stderr)
            return 1
        names = dict(zip(batch["job_ids"], _plan_names(contents, styles, args.mode), strict=True))
        print(f"batch {batch['id']}: {batch['job_count']} job(s) queued")
        for job_id in batch["job_ids"]:
            print(f"  {job_id}  {names[job_id]}")
        if not args.wait:
            return 0
        jobs = wait(client, batch["id"], names)
        return download(client, jobs, names, Path(args.output))


def download(client: StyleQueueClient, jobs: list[dict[str, Any]], names: dict[str, str], out: Path) -> int:
    failed = 0
    for job in jobs:
        if job["status"] != JobStatus.SUCCEEDED:
            failed += 1
            err = job.get("error") or {}
            print(
                f"{job['id']} {names.get(job['id'], '')}: {job['status']} "
                f"{err.get('code', '')} {err.get('message', '')}".rstrip()
            )
            continue
        ext = result_extension(str(job["params"].get("output_format", "png")))
        path = client.download_result(job["id"], out / f"{names.get(job['id'], job['id'])}.{ext}")
        print(f"{job['id']} -> {path}")
    return 1 if failed else 0


def status(args: argparse.Namespace) -> int:
    """The job with this id, else the batch; ``no job or batch ID`` when neither is yours."""
    from api.client import StyleQueueClient

    with StyleQueueClient(args.url, args.key) as client:
        job = _found(lambda: client.get_job(args.id))
        if job is not None:
            _print_job(job, args.url)
            return 0
        batch = _found(lambda: client.get_batch(args.id))
        if batch is None:
            print(f"stylequeue: no job or batch {args.id} (for this API key)", file=sys.stderr)
            return 1
        counts = " ".join(f"{k}={v}" for k, v in batch["counts"].items() if v)
        print(
            f"batch {batch['id']}: {batch['job_count']} job(s), {100 * batch['progress']:.0f}% done; {counts}"
        )
        return 0


def _found(get: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """What ``get`` answers, or None for a 404 (any other error is raised)."""
    from api.client import ApiError

    try:
        return get()
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def _print_job(job: dict[str, Any], url: str) -> None:
    prog = job["progress"]
    handed = f" (+{job['handed_back']} handed back)" if job.get("handed_back") else ""
    print(
        f"job {job['id']}: {job['status']} {100 * (prog.get('fraction') or 0):.0f}%"
        f" attempts={job['attempts']}{handed}"
    )
    if job["error"]:
        print(f"  error {job['error']['code']}: {job['error']['message']}")
    if job["result_url"]:  # the API's route (it redirects to storage): never a presigned link
        print(f"  result {url.rstrip('/')}/v1/jobs/{job['id']}/result")
