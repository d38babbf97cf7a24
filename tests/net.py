"""Loopback and process helpers shared by the test fixtures and the bench scripts (no pytest
import)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, wait, then SIGKILL the process group if it is still there (a blocked event loop
    never handles SIGTERM)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return int(proc.returncode)
