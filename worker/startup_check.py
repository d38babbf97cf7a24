"""The start-up check of a worker (``worker.registry``): can its weights load, is its device there?

``check_weights`` loads the weights once in a short subprocess (``python -m worker.startup_check
SPEC``, CUDA hidden), on the CPU: Celery's main process, which forks the pool later, never initialises
CUDA, runs no torch kernels and never holds the 80-550 MB. ``device_of`` reads the device without CUDA
(``nvidia-smi``, ``CUDA_VISIBLE_DEVICES``). A failure's ``detail`` says what to do.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared import logs
from shared.settings import get_settings

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 900.0  # a first ``imagenet`` start may download 548 MB
STYLE_LOSSES = ("gram", "w2")
RANDOM_SOURCE = "random(seed=0)"  # as worker.engine.weights names the seeded random weights
FIX = (
    "Fix: run `stylequeue weights fetch` (`stylequeue weights info` shows what is installed), or set "
    "STYLEQUEUE_WEIGHTS=PATH (a torchvision VGG19 state dict), caffe:PATH, or random (tests only); "
    "then start the worker again"
)
DEVICE_FIX = (
    "Fix: set STYLEQUEUE_DEVICE to auto, cpu or a cuda:N this machine has; then start the worker again"
)


@dataclass(frozen=True)
class WeightsCheck:
    """What loading ``spec`` gave: ``source`` and ``kind`` (as the engine names them), or an error."""

    ok: bool
    spec: str
    source: str
    kind: str | None = None
    code: str | None = None
    message: str | None = None

    def detail(self) -> str | None:
        if self.ok:
            return None
        return f"cannot load the VGG19 weights {self.spec!r} [{self.code}]: {self.message}. {FIX}"


def load_here(spec: str) -> WeightsCheck:
    """Load the weights in this process, on the CPU (the check's subprocess)."""
    from worker.engine.errors import EngineError
    from worker.engine.weights import resolve_weights

    try:
        loaded = resolve_weights(spec)
    except EngineError as exc:
        return WeightsCheck(False, spec, spec, code=exc.code, message=exc.message)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the check's answer
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return WeightsCheck(
            False, spec, spec, code="weights_invalid", message=f"{type(exc).__name__}: {first}"
        )
    return WeightsCheck(True, spec, loaded.source, kind=loaded.kind)


def check_weights(spec: str, timeout_s: float = CHECK_TIMEOUT_S) -> WeightsCheck:
    """``load_here`` in a subprocess with CUDA hidden; its log goes to this process's stderr. Random
    weights (tests and demos) load nothing, so they need no subprocess."""
    if spec.strip() == "random":
        return WeightsCheck(True, spec, RANDOM_SOURCE, kind="random")
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    command = [sys.executable, "-m", "worker.startup_check", spec]
    try:
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return WeightsCheck(
            False, spec, spec, code="weights_timeout", message=f"not loaded in {timeout_s:.0f}s"
        )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        return WeightsCheck(**json.loads(lines[-1]))
    except (IndexError, ValueError, TypeError):
        message = f"the weights check exited with code {done.returncode} (see the log above)"
        return WeightsCheck(False, spec, spec, code="weights_check_failed", message=message)


def device_of(spec: str) -> tuple[str, str, str | None]:
    """(device, kind, problem), found without CUDA: ``auto`` is cuda:0 when a GPU is visible."""
    from worker.supervisor import detect_gpus

    if spec == "auto":
        return ("cuda:0", "cuda", None) if detect_gpus() else ("cpu", "cpu", None)
    kind = spec.split(":", 1)[0]
    if kind == "cuda" and not detect_gpus():
        return spec, kind, f"STYLEQUEUE_DEVICE={spec} but no GPU is visible here. {DEVICE_FIX}"
    return spec, kind, None


def capabilities(device_kind: str, weights_kind: str | None, batch_max: int = 1) -> dict[str, Any]:
    """What the ``workers`` row advertises (``batch_max``: jobs it runs as one batch, worker.batch)."""
    return {
        "batch_max": batch_max,
        "style_loss": list(STYLE_LOSSES),
        "masks": True,
        "device_kind": device_kind,
        "weights_kind": weights_kind,
        "random_weights": weights_kind == "random",
    }


def engine_detail(spec: str, exc: BaseException) -> str:
    """Why a pool process marked its worker unhealthy: the engine's message and what to do."""
    from worker.engine.errors import EngineError, WeightsError

    what = f"a pool process could not load the engine (weights {spec!r}, device {get_settings().device!r})"
    if isinstance(exc, WeightsError):
        return f"{what} [{exc.code}]: {exc.message}. {FIX}"
    if isinstance(exc, EngineError):
        return f"{what} [{exc.code}]: {exc.message}. {DEVICE_FIX}"
    return f"{what}: {type(exc).__name__}; see the worker log"


def main(argv: list[str]) -> int:
    """The check's subprocess: one JSON line on stdout (the log goes to stderr)."""
    logs.configure(logging.WARNING)
    sys.stdout.write(json.dumps(asdict(load_here(argv[0] if argv else get_settings().weights))) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
