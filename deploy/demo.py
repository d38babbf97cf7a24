"""``make demo``: the whole service on this machine, no servers needed, in a few minutes on a CPU.

Starts ``stylequeue api``, ``stylequeue worker`` and ``stylequeue dispatch`` on the embedded default
(SQLite, kombu's SQL transport and a folder, all in a fresh ``demo-out/.stylequeue``), creates an API
key, submits ONE batch over HTTP (4 content photos x 2 paintings from examples/images), shows
progress, downloads the 8 results into demo-out/ and writes demo-out/contact_sheet.png (content |
style | result per row). There is no deadline while the jobs make progress (a busy machine is only
slower); after ``--stall-timeout`` seconds without any, it stops, keeping the results that finished
and a contact sheet of them. Everything it started is stopped on success, failure or Ctrl-C.

    python deploy/demo.py --weights imagenet     # real stylisation (VGG19 weights needed)
    python deploy/demo.py --weights random       # no download: runs the machinery, not the art
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from api.client import ApiError, StyleQueueClient  # noqa: E402
from deploy.demo_report import (  # noqa: E402
    DemoError,
    Stalled,
    Watchdog,
    contact_sheet,
    describe,
    progress_line,
    progress_state,
    sheet_caption,
)

IMAGES = REPO / "examples" / "images"
STYLES = ("style_vangogh_night_cafe.jpg", "style_hokusai_great_wave.jpg")
WEIGHTS_CODES = {"weights_unavailable", "weights_invalid"}
TERMINAL = {"succeeded", "failed", "canceled"}
STALL_S = 300.0  # no job moved for this long: something is stuck (a worker that never started, ...)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy/demo.py", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--weights", default="imagenet", help="imagenet (default) or random")
    p.add_argument("--out", type=Path, default=REPO / "demo-out", help="output folder")
    p.add_argument("--size", type=int, default=192, help="result long edge (px)")
    p.add_argument("--iterations", type=int, default=50, help="iterations per scale")
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=STALL_S,
        help=f"stop after this many seconds in which no job made progress (default {STALL_S:.0f})",
    )
    p.add_argument(
        "--timeout", type=float, default=0, help="also stop after this many seconds in all (0: never)"
    )
    return p


def main() -> int:
    args = build_parser().parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    demo = Demo(args)
    started = time.monotonic()
    try:
        demo.run()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the API and the worker", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        demo.stop()
    print(f"done in {time.monotonic() - started:.0f}s: results and contact_sheet.png in {args.out}")
    return 0


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out.resolve()
        self.data = self.out / ".stylequeue"
        self.logs = self.out / "logs"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = _free_port()
        self.clock: Callable[[], float] = time.monotonic
        self.sleep: Callable[[float], None] = time.sleep
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
        self.env.update(
            STYLEQUEUE_DATA_DIR=str(self.data),
            STYLEQUEUE_WEIGHTS=args.weights,
            STYLEQUEUE_API_PORT=str(self.port),
            STYLEQUEUE_PROGRESS_INTERVAL_S="0.5",
            PYTHONUNBUFFERED="1",
        )

    # --- processes ---
    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "shared.cli", *args]
        out = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            raise DemoError(f"`stylequeue {' '.join(args)}` failed:\n{out.stderr[-2000:]}")
        return out

    def start(self, name: str, *args: str) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *args],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in 30 s: killing it", file=sys.stderr)
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise DemoError(f"the {name} exited with code {proc.returncode}:\n{tail}")

    # --- the demo ---
    def run(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        print(
            f"data folder {self.data} (SQLite + SQL broker + local storage), weights "
            f"{self.args.weights}; logs in {self.logs}"
        )
        self.cli("migrate")
        self.start("worker", "worker")
        self.start("api", "api", "--port", str(self.port))
        # The dispatcher, run beside every deployment: the jobs wait in the job table and it
        # publishes them into free worker slots in fair order, re-sending any message lost.
        self.start("dispatcher", "dispatch")
        key = self.cli("keys", "create", "--tenant", "demo").stdout.strip().splitlines()[-1]
        url = f"http://127.0.0.1:{self.port}"
        self.wait_api(url)
        with StyleQueueClient(url, key, timeout=60) as client:
            names, batch = self.submit(client)
            self.finish(client, batch, names)

    def finish(self, client: StyleQueueClient, batch_id: str, names: dict[str, str]) -> None:
        """Follow the batch; then save what succeeded and its contact sheet, all of it or, when
        the batch stalled or some jobs failed, the part that finished (and say so)."""
        try:
            jobs = self.follow(client, batch_id)
        except Stalled:
            self.deliver(client, client.list_jobs(batch_id=batch_id), names)
            raise
        self.deliver(client, jobs, names)
        bad = [j for j in jobs if j["status"] != "succeeded"]
        if bad:
            err = bad[0].get("error") or {}
            raise DemoError(
                f"{len(bad)} job(s) did not succeed, e.g. {bad[0]['id']}: "
                f"{bad[0]['status']} {err.get('code')}: {err.get('message')}"
            )

    def wait_api(self, url: str) -> None:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise DemoError(f"the API did not answer on {url} within 60 s")

    def submit(self, client: StyleQueueClient) -> tuple[dict[str, str], str]:
        contents = sorted(
            p for p in IMAGES.iterdir() if p.name.startswith("content_") and p.suffix in (".png", ".jpg")
        )[:4]
        names: dict[str, str] = {}
        for path in [*contents, *(IMAGES / s for s in STYLES)]:
            names[client.upload_path(path)] = path.name
        ids = list(names)
        params = self.params()
        batch = client.submit_batch(ids[: len(contents)], ids[len(contents) :], params=params)
        print(f"submitted batch {batch['id']}: {describe(len(contents), len(STYLES), params)}")
        return names, str(batch["id"])

    def params(self) -> dict[str, Any]:
        return {
            "size": self.args.size,
            "min_size": max(16, self.args.size // 2),
            "scale_factor": 2,
            "iterations": self.args.iterations,
        }

    def follow(self, client: StyleQueueClient, batch_id: str) -> list[dict[str, Any]]:
        watchdog = Watchdog(self.args.stall_timeout, self.args.timeout, self.clock)
        last, warned = "", False
        while True:
            self.check_alive()
            jobs = client.list_jobs(batch_id=batch_id)
            _check_weights(jobs)
            line = progress_line(jobs)
            if line != last:
                print(f"[{self.clock() - watchdog.started:5.0f}s] {line}", flush=True)
                last = line
            if jobs and all(j["status"] in TERMINAL for j in jobs):
                return jobs
            quiet = watchdog.observe(progress_state(jobs))
            if quiet > watchdog.stall_s / 2 and not warned:
                print(f"no progress for {quiet:.0f}s; still waiting (logs in {self.logs})", flush=True)
            warned = quiet > watchdog.stall_s / 2
            self.sleep(1)

    def deliver(self, client: StyleQueueClient, jobs: list[dict[str, Any]], names: dict[str, str]) -> int:
        """Download the results that succeeded and write the contact sheet of them."""
        rows = []
        done = [j for j in jobs if j["status"] == "succeeded"]
        for job in sorted(done, key=lambda j: (names[j["content_id"]], names[j["style_ids"][0]])):
            content, style = names[job["content_id"]], names[job["style_ids"][0]]
            dest = self.out / f"{Path(content).stem}__{Path(style).stem}.png"
            try:
                client.download_result(job["id"], dest)
            except ApiError as exc:
                raise DemoError(f"could not download the result of {job['id']}: {exc}") from exc
            rows.append((IMAGES / content, IMAGES / style, dest))
        if rows:
            contact_sheet(rows, self.out / "contact_sheet.png", sheet_caption(done, len(jobs)))
        partial = f" (of {len(jobs)} jobs)" if len(rows) < len(jobs) else ""
        sheet = " and contact_sheet.png" if rows else ""
        print(f"downloaded {len(rows)} results{partial}{sheet} into {self.out}")
        return len(rows)


def _check_weights(jobs: list[dict[str, Any]]) -> None:
    weights_error = next((j for j in jobs if (j.get("error") or {}).get("code") in WEIGHTS_CODES), None)
    if weights_error:
        raise DemoError(
            f"the worker has no VGG19 weights: {weights_error['error']['message']}\n"
            "  remedy: `stylequeue weights fetch` (needs the internet once), or run the "
            "demo without them: `make demo WEIGHTS=random`"
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
