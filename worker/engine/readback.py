"""A group's report values read back to the host in one transfer (group.py, on CUDA).

The plain read is one blocking ``.tolist()`` per tensor: on CUDA each is a device-to-pageable copy and a
stream synchronisation, five or six per report. Here the values are packed into one float64 (B, K)
tensor on the device and copied, ``non_blocking``, into a pinned host buffer allocated once per scale;
an event recorded after the copy is what the host waits on (the copy, not a synchronisation of the
stream: the device goes on with whatever is queued). Pinned memory needs a CUDA device, so on the CPU
the group keeps the plain read.

The report still needs this iteration's values (its progress, divergence test and checkpoint are of
that iteration), so the host waits for the queue to reach the copy, as the plain read does: what is
saved is the transfers, not the wait. A copy every iteration would only be overwritten unread, so the
group stages its values at the report iterations alone.

float64 holds every value exactly: float32/bf16 losses, float64 learning rates, int64 counts (< 2^53)
and flags, so a read gives what ``.tolist()`` of each tensor gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch


class EventLike(Protocol):
    """What the reader needs of torch.cuda.Event (tests pass a fake on the CPU)."""

    def record(self) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


def _cuda_event() -> EventLike:
    event: EventLike = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch leaves __new__ untyped
    return event


def _caster(dtype: torch.dtype) -> Callable[[float], Any]:
    """How a float64 value returns to the Python type ``.tolist()`` gives for this dtype."""
    if dtype == torch.bool:
        return bool
    if dtype.is_floating_point or dtype.is_complex:
        return float
    return int


class PinnedReadback:
    """``stage(columns)`` on the device's stream, then ``read()`` on the host: per column, what
    ``column.tolist()`` gives ((B,) -> B scalars, (B, k) -> B lists of k), from one host read.

    ``pin=False`` and a fake ``event`` run it on the CPU (tests); the group uses it on CUDA only."""

    def __init__(
        self,
        rows: int,
        width: int,
        *,
        pin: bool = True,
        event: Callable[[], EventLike] = _cuda_event,
    ) -> None:
        self.buffer = torch.empty((rows, width), dtype=torch.float64, pin_memory=pin)
        self.event = event()
        self._layout: list[tuple[int, int | None, Callable[[float], Any]]] = []  # (offset, k, cast)
        self.reads = 0  # host reads made
        self.waits = 0  # of them, reads that found the copy still in flight and waited for it

    def stage(self, columns: Sequence[torch.Tensor]) -> None:
        """Copy the columns (each (B,) or (B, k)) to the pinned buffer without a host sync."""
        rows, width = self.buffer.shape
        flat = [c.detach().reshape(rows, -1) for c in columns]
        if sum(f.shape[1] for f in flat) != width:
            raise ValueError(f"columns of {[tuple(c.shape) for c in columns]} do not fill width {width}")
        layout, offset = [], 0
        for c, f in zip(columns, flat, strict=True):
            layout.append((offset, f.shape[1] if c.dim() > 1 else None, _caster(c.dtype)))
            offset += f.shape[1]
        packed = torch.cat([f.to(torch.float64) for f in flat], dim=1)
        # the device tensor is freed when this returns; the caching allocator reuses its memory only
        # in stream order, after the copy
        self.buffer.copy_(packed, non_blocking=True)
        self.event.record()
        self._layout = layout

    def read(self) -> list[list[Any]]:
        """The staged columns as host values; waits for the copy if it is still in flight."""
        if not self._layout:
            raise RuntimeError("read() before stage(): nothing was copied")
        if not self.event.query():
            self.waits += 1
            self.event.synchronize()
        rows = self.buffer.tolist()  # host memory now: one host read, no device transfer
        self.reads += 1
        out: list[list[Any]] = []
        for offset, k, cast in self._layout:
            if k is None:
                out.append([cast(r[offset]) for r in rows])
            else:
                out.append([[cast(v) for v in r[offset : offset + k]] for r in rows])
        self._layout = []  # one read per stage: a second would hand back stale values
        return out


__all__ = ["EventLike", "PinnedReadback"]
