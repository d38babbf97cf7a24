"""The process supervisor behind ``stylequeue worker`` (shared/server_cli.py): one Celery worker per GPU.

The supervisor here never imports torch or touches CUDA: it counts GPUs with ``nvidia-smi -L`` (or
``/proc/driver/nvidia/gpus``), starts ``celery worker`` once per GPU with ``CUDA_VISIBLE_DEVICES`` set
and node name ``gpu<i>@<host>`` (or one ``cpu@<host>`` worker without a GPU), each in its own process
group, forwards SIGTERM/SIGINT to them and waits. SIGTERM is a warm shutdown in which a running
job is handed back to the queue at its next iteration; a second signal makes the shutdown cold.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from shared.settings import Settings

logger = logging.getLogger(__name__)


def config_problem(settings: Settings) -> str | None:
    """Why this worker configuration must not start, or None."""
    if settings.visibility_timeout_s <= settings.task_time_limit_s:
        return (
            f"STYLEQUEUE_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s}) must be greater than "
            f"STYLEQUEUE_TASK_TIME_LIMIT_S ({settings.task_time_limit_s}): otherwise the broker hands "
            "a long job to a second worker while the first is still running it"
        )
    return None


def detect_gpus() -> list[str]:
    """GPU indices visible to this machine, found without initialising CUDA in this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        if out.returncode == 0:
            return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]
    except (OSError, subprocess.SubprocessError):
        pass
    proc = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(proc.iterdir())))] if proc.is_dir() else []


def celery_command(node: str, args: argparse.Namespace, settings: Settings) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.tasks",
        "worker",
        "-P",
        "prefork",
        "-c",
        str(max(1, args.concurrency)),
        "-O",
        "fair",
        "-n",
        node,
        "-Q",
        settings.queue_name,
        "--loglevel",
        args.loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


def plan(args: argparse.Namespace, settings: Settings) -> list[tuple[str, dict[str, str]]]:
    """(node name, extra environment) for each worker process to start."""
    host = socket.gethostname()
    if args.cpu or settings.device == "cpu":
        gpus: list[str] = []
    elif args.gpus:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    else:
        gpus = detect_gpus()
    if not gpus:
        return [(f"cpu@{host}", {"CUDA_VISIBLE_DEVICES": ""})]
    return [(f"gpu{g}@{host}", {"CUDA_VISIBLE_DEVICES": g}) for g in gpus]


def start(args: argparse.Namespace, settings: Settings) -> int:
    """Start the planned workers and supervise them until they exit; their exit code. With
    ``STYLEQUEUE_WORKER_METRICS_PORT`` this process serves every worker's metrics (``shared.metrics``)."""
    from shared.metrics import host_metrics

    children: list[subprocess.Popen[bytes]] = []
    with host_metrics(settings.worker_metrics_port, settings.metrics_token) as metrics_env:
        for node, extra in plan(args, settings):
            env = {**os.environ, **extra, **metrics_env}
            logger.info("starting worker %s (CUDA_VISIBLE_DEVICES=%r)", node, extra["CUDA_VISIBLE_DEVICES"])
            children.append(
                subprocess.Popen(
                    celery_command(node, args, settings), env=env, preexec_fn=_own_group_dies_with_parent
                )
            )
        return supervise(children)


def _own_group_dies_with_parent() -> None:
    """In the child before exec: its own process group (a terminal's Ctrl-C reaches only us, and we
    forward it), and SIGTERM when this supervisor dies so no worker outlives it (Linux only)."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(children: list[subprocess.Popen[bytes]]) -> int:
    """Forward SIGTERM/SIGINT to every worker; stop all when one exits."""
    signals_seen = 0

    def forward(signum: int, _frame: object) -> None:
        nonlocal signals_seen
        signals_seen += 1
        sig = signal.SIGTERM if signals_seen == 1 else signal.SIGQUIT
        logger.info("signal %s: sending %s to %d worker(s)", signum, sig.name, len(children))
        _signal_all(children, sig)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = 0
        while any(c.poll() is None for c in children):
            exited = [c for c in children if c.poll() is not None]
            if exited and signals_seen == 0:
                code = exited[0].returncode or 1
                logger.error("a worker exited with code %s: stopping the others", code)
                signals_seen = 1
                _signal_all(children, signal.SIGTERM)
            time.sleep(0.2)
        if signals_seen == 0:
            code = max((c.returncode or 0) for c in children)
        return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _signal_all(children: list[subprocess.Popen[bytes]], sig: signal.Signals) -> None:
    """Signal each Celery main process (SIGTERM: warm shutdown, running jobs are handed back;
    SIGQUIT: cold). Its pool processes die with it (billiard sets their parent-death signal)."""
    for child in children:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)
