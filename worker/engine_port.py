"""What the worker needs from the engine: the typed seam between ``worker/`` and ``worker/engine/``.

``worker.runner`` runs a job through any ``EnginePort``: the real ``worker.engine.StyleTransfer``
(``worker.runtime.get_engine``) or the tests' ``tests.worker.fakes.FakeEngine``; mypy checks that both
fit. The callback contract:

* ``on_progress(Progress)`` after every iteration; returning ``CHECKPOINT_NOW`` asks for a checkpoint
  of that iteration (a worker shutting down hands its job back with no work lost), ``None`` goes on;
* ``on_checkpoint(Checkpoint)`` at each scale's end, every ``save_every`` iterations and when asked;
* an exception raised by either callback (the watcher's ``JobStopped``) ends ``run`` unchanged.

Importing this module does not import torch: the engine's types are imported for type checking only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from worker.engine import Checkpoint, Progress, TransferConfig

# ``on_progress``: None to go on, or the engine's ``CHECKPOINT_NOW`` to have this iteration checkpointed.
ProgressCallback = Callable[["Progress"], "str | None"]
CheckpointCallback = Callable[["Checkpoint"], None]


class EngineResult(Protocol):
    """What the worker reads of a run's ``worker.engine.Result``."""

    @property
    def image(self) -> Image.Image: ...  # the stylised image, RGB

    @property
    def metadata(self) -> Mapping[str, Any]: ...


class EnginePort(Protocol):
    """The engine as the worker uses it: one content image, its styles (and masks), one config."""

    def run(
        self,
        content: Image.Image,
        styles: Sequence[Image.Image],
        config: TransferConfig,
        *,
        masks: Sequence[Image.Image] | None = None,
        on_progress: ProgressCallback | None = None,
        on_checkpoint: CheckpointCallback | None = None,
        resume: Checkpoint | None = None,
    ) -> EngineResult: ...


__all__ = ["CheckpointCallback", "EnginePort", "EngineResult", "ProgressCallback"]
