"""An opt-in graph mode for the VGG evaluation, for bench/gpu.py to measure against eager.

``compiled_features(model, mode)`` routes the model's gradient-carrying calls (the optimised images'
evaluations) through ``torch.compile`` of its forward, so AOTAutograd compiles the backward to the
input too; mode "reduce-overhead" adds CUDA graphs (inductor's cudagraph trees). Target passes (no
gradient, run once per scale) stay eager: compiling them would only add compile time. The engine's
production path is eager and nothing here turns graph mode on: it is kept only where it is measured
faster, which has not been done on a GPU yet.

Known failure: inductor's ``replication_pad2d_backward`` asserts contiguous strides where the eager
kernel gives channels_last ones (conv1_1's replicate padding, ``pad_replicate``, under channels_last;
reproduced on the CPU with torch 2.x). ``eager_head=True`` runs the normalisation and conv1_1 eagerly
and compiles the rest, which leaves that op out of the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .vgg import VGGFeatures

Features = dict[int, torch.Tensor]
Forward = Callable[[torch.Tensor, frozenset[int]], Features]

BACKENDS = ("aot_eager", "eager")  # torch.compile backends that generate no code: a tracing check
MODES = ("reduce-overhead", "default", "max-autotune-no-cudagraphs", "max-autotune")  # inductor's


@dataclass
class GraphCalls:
    compiled: int = 0  # evaluations through the compiled function
    eager: int = 0  # calls left eager (no gradient: target passes)


def cudagraph_skips() -> int:
    """How often inductor has run a graph without CUDA graphs so far (its counter; 0 where this torch
    has none): "reduce-overhead" falls back silently, so a measurement says when it did."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # a torch without the private counter
        return 0
    return int(counters["inductor"]["cudagraph_skips"])


def layers_from(model: VGGFeatures, first: int, x: torch.Tensor, wanted: frozenset[int]) -> Features:
    """VGGFeatures.forward's loop from layer ``first`` on; x is layer ``first - 1``'s output."""
    out: Features = {}
    for i in range(first, max(wanted) + 1):
        layer = model.layers[i]
        # in place as VGGFeatures.forward does, but never on the input: the caller's tensor, which
        # autograd may hold
        inplace = i > first and (i - 1) not in wanted
        x = F.relu(x, inplace=inplace) if isinstance(layer, nn.ReLU) else layer(x)
        if i in wanted:
            out[i] = x
    return out


def compile_forward(fn: Forward, mode: str) -> Forward:
    """torch.compile with static shapes and no graph breaks (a break would leave part of the
    evaluation eager while it is reported as graph mode)."""
    if mode in BACKENDS:
        return torch.compile(fn, backend=mode, dynamic=False, fullgraph=True)
    if mode in MODES:
        return torch.compile(fn, mode=mode, dynamic=False, fullgraph=True)
    raise ValueError(f"unknown graph mode {mode!r}: one of {', '.join(MODES + BACKENDS)}")


@contextmanager
def compiled_features(model: VGGFeatures, mode: str, *, eager_head: bool = False) -> Iterator[GraphCalls]:
    """While active, ``model``'s evaluations with a gradient run compiled; on exit the model is
    eager again and torch's compile caches (and CUDA graph memory pools) are dropped."""
    calls = GraphCalls()
    if eager_head:
        compiled = compile_forward(lambda h, wanted: layers_from(model, 1, h, wanted), mode)
    else:
        compiled = compile_forward(lambda x, wanted: VGGFeatures.forward(model, x, wanted), mode)

    def forward(x: torch.Tensor, wanted: frozenset[int]) -> Features:
        if not (torch.is_grad_enabled() and x.requires_grad):
            calls.eager += 1
            return VGGFeatures.forward(model, x, wanted)
        calls.compiled += 1
        if not eager_head:
            return compiled(x, wanted)
        h = model.layers[0](model.normalize(x))
        tail = compiled(h, wanted) if max(wanted) > 0 else {}
        return {0: h, **tail} if 0 in wanted else tail

    # an instance attribute: nn.Module.__call__ looks forward up on the instance first
    vars(model)["forward"] = forward
    try:
        yield calls
    finally:
        vars(model).pop("forward", None)
        torch.compiler.reset()


__all__ = [
    "BACKENDS",
    "MODES",
    "GraphCalls",
    "compile_forward",
    "cudagraph_skips",
    "compiled_features",
    "layers_from",
]
