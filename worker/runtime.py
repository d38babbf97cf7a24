"""The style-transfer engine, loaded once per worker *pool process*, never in the parent.

CUDA must not be initialised before prefork's fork, so nothing here runs at import. When a pool
process starts (``worker_process_init``), loading begins in a background thread (that signal's handler
must return within seconds); the first job waits for it if it is not done. A failed load (e.g. missing
imagenet weights) is not cached: the next job tries again and fails with the engine's ``WeightsError``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared import logs
from shared.settings import Settings, get_settings
from worker.watcher import SHUTDOWN

if TYPE_CHECKING:
    from worker.engine import StyleTransfer

logger = logging.getLogger(__name__)

_lock = threading.RLock()  # held while the model is built, so a first job waits for preload
_engine: StyleTransfer | None = None
_key: tuple[str, str] | None = None


def get_engine(settings: Settings) -> StyleTransfer:
    """The process's ``StyleTransfer`` for ``settings.weights`` on ``settings.device``.

    While ``preload`` is still building the model, this waits for it (the lock), so a first job never
    builds a second copy."""
    global _engine, _key
    key = (settings.weights, settings.device)
    with _lock:
        if _engine is None or _key != key:
            from worker.engine import StyleTransfer

            started = time.monotonic()
            _engine = StyleTransfer(weights=settings.weights, device=settings.device, seed=0)
            _key = key
            logs.event(
                logger,
                "engine_loaded",
                kind="worker",
                weights=settings.weights,
                device=getattr(_engine, "device", settings.device),
                seconds=f"{time.monotonic() - started:.2f}",
            )
        return _engine


def warm(settings: Settings) -> None:
    """Load the weights and build the VGG19 model the default layers need, on the worker's device."""
    from worker.engine.config import DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS
    from worker.engine.transfer import resolve_device
    from worker.engine.vgg import layer_index

    deepest = max(layer_index(n) for n in (*DEFAULT_CONTENT_LAYERS, *DEFAULT_STYLE_LAYERS))
    with _lock:
        engine = get_engine(settings)
        engine.model(settings.weights, resolve_device(settings.device), "max", deepest)


def preload(on_error: Callable[[Exception], None] | None = None) -> None:
    """Start loading the engine in the background (errors are logged, and passed to ``on_error``:
    ``worker.registry`` marks the worker unhealthy; the job reports them)."""

    def load() -> None:
        try:
            warm(get_settings())
        except Exception as exc:  # noqa: BLE001 - preloading is an optimisation; the first job loads it
            logs.event(logger, "engine_preload_failed", kind="worker", level=logging.WARNING, error=exc)
            if on_error is not None:
                on_error(exc)

    threading.Thread(target=load, name="engine-preload", daemon=True).start()


def init_pool_process(on_error: Callable[[Exception], None] | None = None, **_: object) -> None:
    """``worker_process_init`` handler (in each pool process): load the engine in the background."""
    SHUTDOWN.clear()
    preload(on_error)


def on_worker_shutting_down(**_: object) -> None:
    """``worker_shutting_down`` handler (in Celery's main process, warm shutdown): running jobs
    stop at their next iteration and are handed back to the queue (see ``worker.watcher``)."""
    SHUTDOWN.set()


def reset_for_tests() -> None:
    global _engine, _key
    with _lock:
        _engine, _key = None, None
