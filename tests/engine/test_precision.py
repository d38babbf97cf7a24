"""fp16 gets dynamic loss scaling (its gradients would underflow to zero); bf16 and fp32 get none."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from PIL import Image

from worker.engine import Checkpoint, StyleTransfer
from worker.engine import transfer as transfer_mod
from worker.engine.optim import Stepper
from worker.engine.scaler import GROWTH_INTERVAL, INIT_SCALE, MAX_SCALE, LossScaler

from .conftest import small_config

_W = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _fp16_loss(grad_size: float, w: torch.Tensor = _W) -> Callable[[torch.Tensor], torch.Tensor]:
    """A loss whose gradient passes an fp16 tensor with entries w * grad_size, as the VGG backward
    does under fp16 autocast."""

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        y = x.half().float()  # the backward casts dL/dy to fp16 here
        total = (y * w).sum() * grad_size
        return torch.stack([total, total, total * 0, total * 0, total * 0])

    return loss_fn


@pytest.mark.parametrize("kind", ["adam", "lbfgs"])
def test_scaled_fp16_gradient_does_not_underflow(kind: str) -> None:
    """1e-9 is below fp16's smallest subnormal (6e-8): unscaled, the gradient is exactly zero and
    the image never moves; that is what a 512 px fp16 job did."""
    x0 = torch.full((1, 3, 8, 8), 0.5)
    plain = Stepper(x0, _fp16_loss(1e-9), kind, 0.01)
    plain._evaluate()
    assert plain.x.grad is not None and torch.count_nonzero(plain.x.grad) == 0  # the bug
    scaled = Stepper(x0, _fp16_loss(1e-9), kind, 0.01, scaler=LossScaler())
    scaled._evaluate()
    assert scaled.x.grad is not None
    # 1e-9 * 2**16 is near fp16's smallest normal: 11 bits, or a subnormal's step of 2**-24
    assert torch.allclose(scaled.x.grad, _W * 1e-9, rtol=1e-3, atol=2**-24 / INIT_SCALE)
    if kind == "adam":  # scale-free steps (L-BFGS's first one is lr * g / sum|g|, 1e-9 here)
        for _ in range(3):
            scaled.step()
            plain.step()
        assert (scaled.x.detach() - x0).abs().min() > 0  # every pixel moved
        assert torch.equal(plain.x.detach(), x0)  # unscaled, none did
    assert scaled.recoveries == 0 and scaled.scaler is not None and scaled.scaler.scale == INIT_SCALE


def test_overflow_halves_the_scale_and_evaluates_again() -> None:
    calls = {"n": 0}
    ones = torch.ones(1, 3, 8, 8)
    loss = _fp16_loss(2.0, ones)  # x 2**16 and x 2**15 pass 65504, the fp16 maximum: inf

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return loss(x)

    scaler = LossScaler()
    stepper = Stepper(torch.full((1, 3, 8, 8), 0.5), counted, "adam", 0.01, scaler=scaler)
    stepper.step()
    assert scaler.scale == INIT_SCALE / 4 and calls["n"] == 3  # 2**16 and 2**15 overflowed
    assert stepper.recoveries == 0 and stepper.streak == 0  # not a NaN recovery
    stepper._evaluate()
    assert stepper.x.grad is not None and torch.equal(stepper.x.grad, ones * 2.0)  # unscaled, exact


def test_scale_grows_after_a_run_of_finite_steps() -> None:
    scaler = LossScaler()
    for _ in range(GROWTH_INTERVAL - 1):
        assert not scaler.retry(True, True)
    assert scaler.scale == INIT_SCALE
    scaler.retry(True, True)
    assert scaler.scale == 2 * INIT_SCALE and scaler.good == 0
    assert not scaler.retry(False, False)  # a non-finite loss is the NaN guard's
    assert scaler.scale == 2 * INIT_SCALE
    at_min = LossScaler(scale=1.0)
    assert not at_min.retry(True, False) and at_min.scale == 1.0
    assert LossScaler.from_state({"scale": math.inf}).scale == INIT_SCALE
    assert LossScaler.from_state({"scale": MAX_SCALE, "good": 3}) == LossScaler(MAX_SCALE, 3)


@pytest.fixture
def cpu_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """precision="fp16" runs on the CPU here (the engine refuses it there: slow, and not a target)."""
    original = transfer_mod.resolve_precision

    def resolve(precision: str, device: torch.device) -> torch.dtype | None:
        return torch.float16 if precision == "fp16" else original(precision, device)

    monkeypatch.setattr(transfer_mod, "resolve_precision", resolve)


def test_fp16_job_is_loss_scaled_and_resumes(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
    cpu_fp16: None,
) -> None:
    cfg = small_config(precision="fp16", iterations=4, save_every=2)
    saved: list[bytes] = []
    r = engine.run(content, [style], cfg, on_checkpoint=lambda c: saved.append(c.to_bytes()))
    meta = r.metadata
    assert meta["precision"] == "float16" and meta["nan_recoveries"] == 0
    assert meta["loss_scale"] is not None and math.log2(meta["loss_scale"]).is_integer()
    assert all(s["loss"] > 0.1 for s in meta["loss_removed"])
    mid = Checkpoint.from_bytes(saved[2])  # scale 1, iteration 2
    assert (mid.scale, mid.iteration, mid.end_of_scale) == (1, 2, False)
    assert mid.loss_scaler is not None and mid.loss_scaler["scale"] >= 1
    resumed = engine.run(content, [style], cfg, resume=mid)
    assert resumed.tensor is not None and r.tensor is not None
    assert torch.equal(resumed.tensor, r.tensor)
    fp32 = engine.run(content, [style], small_config(iterations=4))
    assert fp32.metadata["loss_scale"] is None  # fp32 and bf16: no scaling
