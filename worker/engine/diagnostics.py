"""Instruments for measuring the engine, shared by its tests and benchmarks."""

from __future__ import annotations

from typing import Any

import torch


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values by the host while active (``with HostReads() as r``): each one
    is a device sync on CUDA, which a batched loop must not make between its reports."""

    READS = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


__all__ = ["HostReads"]
