"""`make deploy-test`: deploy/compose.yaml brought up for real on this machine, used, broken, torn down.

1. Images: the API and CPU worker images (deploy/images.py: wheelhouse, no network in builds) and,
   where no registry is reachable, stand-ins for PostgreSQL, Redis, S3 (moto) and Flower.
2. The stack: compose.yaml with its CPU variant (deploy/compose_cpu.py: CPU workers, random weights,
   no GPU reservation) and compose.s3-public.yaml (S3 published on loopback: presigned links name it),
   2 workers, a fresh .env of random secrets, free ports on 127.0.0.1; every service must turn healthy.
3. From the host: an API key (`stylequeue keys create` in the api container), then the host's own
   `stylequeue submit --wait` of a 2x2 batch at 32 px; each result is fetched again through its
   presigned public URL. Metrics answer on every role's port; Flower answers.
4. A second 2x2 batch; once a job runs, `docker kill` of the worker container running it, then
   `--scale worker=3`. Every job must succeed, the killed one on a second attempt, and the workers'
   logs must show exactly one success per job.
5. `down -v`: containers, network and volumes go, whatever happened. The wall time is printed.

Works with `docker compose` (v2) and `docker-compose` (v1). Without docker it skips with the reason,
and fails under CI=true. Needs the project's venv (httpx, PyYAML, the `stylequeue` client command).
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
sys.path[:0] = [str(REPO), str(DEPLOY)]

import compose_cpu  # noqa: E402 - deploy/ is not a package
import images  # noqa: E402

from api.client import StyleQueueClient  # noqa: E402

PROJECT = "sqsmoke"
WORK = images.WORK / "smoke"
EXAMPLES = REPO / "examples" / "images"
CONTENTS = [EXAMPLES / "content_chelsea_cat.png", EXAMPLES / "content_astronaut.png"]
STYLES = [EXAMPLES / "style_brick_texture.png", EXAMPLES / "style_hokusai_great_wave.jpg"]
FAST = {"size": 32, "iterations": 20}
SLOW = {"size": 64, "iterations": 250}  # long enough on 2 cores to be killed mid-job
SUCCEEDED = re.compile(r"job_event job_id=(\S+) attempt=\S+ event=succeeded")
SERVICES = ("postgres", "redis", "minio", "api", "worker", "dispatcher", "webhooks", "flower")
T = TypeVar("T")


def log(message: str) -> None:
    print(f"[deploy-test] {message}", flush=True)


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 1.0) -> T:
    """Poll ``probe`` until it returns something other than None (an event, not a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise SystemExit(f"deploy-test: timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def compose_command() -> list[str] | None:
    """`docker compose` (v2) when the CLI has it, else `docker-compose` (v1), else None."""
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
    if v2.returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """One compose project: the CPU compose file plus the public-S3 override, one env file."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        self.env_file = WORK / "smoke.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        self.env_file.chmod(0o600)
        cpu = compose_cpu.write(DEPLOY / "compose.cpu.yaml")
        files = ["-f", str(cpu), "-f", str(DEPLOY / "compose.s3-public.yaml")]
        self.base = [*command, "-p", PROJECT, "--env-file", str(self.env_file), *files]
        # The shell's variables win over --env-file: none of the file's may leak in from outside.
        self.shell = {k: v for k, v in os.environ.items() if k not in env and not k.startswith("COMPOSE_")}
        self.api = f"http://127.0.0.1:{env['STYLEQUEUE_API_HOST_PORT']}"
        self.s3 = env["STYLEQUEUE_S3_PUBLIC_URL"]

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        done = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, env=self.shell, timeout=timeout
        )
        if check and done.returncode != 0:
            raise SystemExit(f"deploy-test: compose {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def containers(self, service: str) -> list[str]:
        return self.run("ps", "-q", service).split()

    def health(self) -> dict[str, str]:
        """container name -> health (or state, for a container without a health check)."""
        ids = [c for s in SERVICES for c in self.containers(s)]
        fmt = "{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}"
        out = subprocess.run(["docker", "inspect", "-f", fmt, *ids], capture_output=True, text=True)
        return dict(line.lstrip("/").split(" ", 1) for line in out.stdout.splitlines() if " " in line)

    def psql(self, sql: str) -> str:
        return self.run("exec", "-T", "postgres", "psql", "-U", "stylequeue", "-d", "stylequeue", "-Atc", sql)


def env_for_stack(standins: dict[str, str] | None) -> dict[str, str]:
    api, s3 = free_port(), free_port()
    env = {
        "STYLEQUEUE_PUBLIC_URL": f"http://127.0.0.1:{api}",
        "STYLEQUEUE_API_BIND": "127.0.0.1",
        "STYLEQUEUE_API_HOST_PORT": str(api),
        "STYLEQUEUE_FORWARDED_ALLOW_IPS": "*",
        "STYLEQUEUE_PRESIGN_EXPIRY_S": "3600",
        "STYLEQUEUE_S3_PUBLIC_URL": f"http://127.0.0.1:{s3}",
        "STYLEQUEUE_MINIO_BIND": "127.0.0.1",
        "STYLEQUEUE_MINIO_HOST_PORT": str(s3),
        "STYLEQUEUE_WEIGHTS": "random",  # no pretrained weights here: says so in every execution
        "STYLEQUEUE_LEASE_S": "15",  # a killed worker's job runs again after about this long
        "MINIO_ROOT_USER": "smoke-admin",
        "MINIO_APP_ACCESS_KEY": "smoke-app",
        "FLOWER_USER": "flower",
    }
    for name in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_APP_SECRET_KEY"):
        env[name] = secrets.token_hex(16)
    for name in ("STYLEQUEUE_METRICS_TOKEN", "FLOWER_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        env[name] = secrets.token_hex(16)
    if standins:
        env |= {
            "STYLEQUEUE_POSTGRES_IMAGE": standins["postgres"],
            "STYLEQUEUE_REDIS_IMAGE": standins["redis"],
            "STYLEQUEUE_MINIO_IMAGE": standins["s3"],
            "STYLEQUEUE_MC_IMAGE": standins["s3"],
            "STYLEQUEUE_FLOWER_IMAGE": standins["flower"],
        }
    return env


def all_healthy(stack: Stack, workers: int) -> dict[str, str] | None:
    health = stack.health()
    running = [n for n in health if "worker" in n]
    if len(running) >= workers and health and all(h in ("healthy", "running") for h in health.values()):
        return health
    return None


def create_key(stack: Stack) -> str:
    out = stack.run("exec", "-T", "api", "stylequeue", "keys", "create", "--tenant", "smoke")
    return out.strip().splitlines()[-1].strip()


def submit_and_wait(stack: Stack, key: str, out: Path) -> None:
    """The host's `stylequeue submit --wait`: uploads, a 2x2 batch, progress, downloads."""
    cli = str(REPO / ".venv" / "bin" / "stylequeue")
    argv = [cli, "submit", *map(str, CONTENTS), *(a for s in STYLES for a in ("--style", str(s)))]
    argv += [f"--param={k}={v}" for k, v in FAST.items()]
    argv += ["--wait", "-o", str(out), "--url", stack.api, "--key", key]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"deploy-test: stylequeue submit --wait failed:\n{done.stdout}\n{done.stderr}")
    results = sorted(out.glob("*.png"))
    if len(results) != 4:
        raise SystemExit(f"deploy-test: expected 4 results in {out}, found {[p.name for p in results]}")


def check_public_links(stack: Stack, jobs: Sequence[dict[str, Any]]) -> None:
    for job in jobs:
        url = job["result_url"] or ""
        if not url.startswith(stack.s3 + "/"):
            raise SystemExit(f"deploy-test: job {job['id']} links {url!r}, not the public S3 {stack.s3}")
        got = httpx.get(url, timeout=30)
        if got.status_code != 200 or not got.content.startswith(b"\x89PNG"):
            raise SystemExit(f"deploy-test: {url} answered {got.status_code}")
        if (job["execution"] or {}).get("random_weights") is not True:
            raise SystemExit(f"deploy-test: job {job['id']} does not say its weights were random")


def check_metrics(stack: Stack, token: str) -> None:
    """Every role's /metrics, from inside the compose network (none of them is published)."""
    code = (
        "import sys, urllib.request as u\n"
        "for url in sys.argv[1:]:\n"
        f"    r = u.urlopen(u.Request(url, headers={{'Authorization': 'Bearer {token}'}}), timeout=10)\n"
        "    assert b'stylequeue_' in r.read(), url\n"
        "    print(url, r.status)\n"
    )
    urls = ["http://127.0.0.1:8000/metrics", "http://worker:9100/metrics", "http://dispatcher:9101/metrics"]
    log(stack.run("exec", "-T", "api", "python", "-c", code, *urls).strip().replace("\n", "; "))
    flower = stack.run("exec", "-T", "api", "python", "-c", _GET.format("http://flower:5555/healthcheck"))
    log(f"flower: {flower.strip()}")


_GET = "import urllib.request as u; print(u.urlopen('{}', timeout=10).read().decode()[:40])"


def running_worker(stack: Stack, batch_id: str) -> tuple[str, str] | None:
    """(job id, container) of a job of ``batch_id`` that has made progress, or None yet."""
    rows = stack.psql(
        f"SELECT id, worker FROM jobs WHERE batch_id = '{batch_id}' AND status = 'running' "
        "AND worker IS NOT NULL AND (progress->>'step')::int > 0 LIMIT 1"
    ).split()
    if not rows:
        return None
    job_id, node = rows[0].split("|", 1)
    host = node.split("@", 1)[-1].split("#", 1)[0]
    matches = [c for c in stack.containers("worker") if c.startswith(host)]
    return (job_id, matches[0]) if matches else None


def kill_mid_job(stack: Stack, client: StyleQueueClient, styles: list[str], contents: list[str]) -> str:
    batch = client.submit_batch(contents, styles, params=SLOW)
    job_id, container = wait_for("a running job", lambda: running_worker(stack, batch["id"]), 300)
    subprocess.run(["docker", "kill", container], check=True, capture_output=True)
    log(f"killed worker container {container[:12]} while it ran job {job_id}")
    stack.run("up", "-d", "--no-build", "--no-recreate", "--scale", "worker=3")
    log("scaled workers to 3")

    def finished() -> list[dict[str, Any]] | None:
        jobs = client.list_jobs(batch_id=batch["id"])
        return jobs if all(j["status"] in ("succeeded", "failed", "canceled") for j in jobs) else None

    jobs = wait_for("the second batch", finished, 900, every_s=2)
    bad = {j["id"]: (j["status"], j["error"]) for j in jobs if j["status"] != "succeeded"}
    if bad:
        raise SystemExit(f"deploy-test: jobs did not succeed after the kill: {bad}")
    killed = next(j for j in jobs if j["id"] == job_id)
    if killed["attempts"] < 2:
        raise SystemExit(f"deploy-test: the killed job {job_id} shows {killed['attempts']} attempt(s)")
    log(f"every job of the second batch succeeded; the killed one on attempt {killed['attempts']}")
    return str(batch["id"])


def check_exactly_once(stack: Stack, job_ids: Sequence[str]) -> None:
    logs = stack.run("logs", "--no-color", "worker")
    wins = collections.Counter(SUCCEEDED.findall(logs))
    wrong = {j: wins[j] for j in job_ids if wins[j] != 1}
    if wrong:
        raise SystemExit(f"deploy-test: successes per job in the workers' logs, not 1: {wrong}")
    log(f"exactly one success per job in the workers' logs ({len(job_ids)} jobs)")


def exercise(stack: Stack, token: str) -> None:
    clock = time.monotonic()
    stack.run("up", "-d", "--no-build", "--scale", "worker=2", timeout=900)
    health = wait_for("every service healthy", lambda: all_healthy(stack, 2), 300, every_s=2)
    log(f"stack up and healthy in {time.monotonic() - clock:.0f} s: {', '.join(sorted(health))}")
    key = create_key(stack)
    clock = time.monotonic()
    submit_and_wait(stack, key, WORK / "results")
    log(f"stylequeue submit --wait: 4 results downloaded in {time.monotonic() - clock:.0f} s")
    with StyleQueueClient(stack.api, key) as client:
        first = client.list_jobs()
        check_public_links(stack, first)
        log(f"all {len(first)} result links are presigned for {stack.s3} and download")
        check_metrics(stack, token)
        contents, styles = (
            sorted({j["content_id"] for j in first}),
            sorted({j["style_ids"][0] for j in first}),
        )
        kill_mid_job(stack, client, styles, contents)
        every = client.list_jobs()
    check_exactly_once(stack, [j["id"] for j in every])


def main() -> int:
    try:
        return smoke()
    finally:
        images.stop_started_daemon()


def smoke() -> int:
    started = time.monotonic()
    if not shutil.which("docker"):
        return skip("no docker command here (apt-get install docker.io docker-compose)")
    images.ensure_daemon()
    command = compose_command()
    if command is None:
        return skip("neither `docker compose` nor `docker-compose` is installed")
    log(f"compose: {' '.join(command)}")
    images.build_images(["api", "worker-cpu"])
    standins = None if images.registry_reachable() else images.build_standins()
    log(f"images ready in {time.monotonic() - started:.0f} s ({'stand-ins' if standins else 'registry'})")
    env = env_for_stack(standins)
    stack = Stack(command, env)
    try:
        exercise(stack, env["STYLEQUEUE_METRICS_TOKEN"])
    finally:
        stack.run("down", "-v", "--remove-orphans", timeout=300, check=False)
        log("torn down (containers, network, volumes)")
    log(f"PASSED in {time.monotonic() - started:.0f} s wall")
    return 0


def skip(reason: str) -> int:
    if os.environ.get("CI") == "true":
        log(f"FAILED: {reason} (CI=true needs docker)")
        return 1
    log(f"SKIPPED: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
