"""One job's coarse-to-fine loop: scales, targets cached per scale, progress and checkpoints."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import color
from .checkpoint import Checkpoint
from .config import TransferConfig
from .errors import EngineError
from .images import resize
from .losses import LossFn, Targets, compute_targets
from .optim import Stepper, diverged, resize_adam_state
from .schedule import Schedule, style_size
from .vgg import VGGFeatures, layer_index

logger = logging.getLogger(__name__)

# Private switch for bench/engine.py: False recomputes the style targets at every iteration, as naive
# implementations do, to measure what caching them once per scale saves.
_CACHE_STYLE_TARGETS = True

# An on_progress callback may return this to have a checkpoint written at the iteration it was told
# about (a worker shutting down hands its job back with no work lost).
CHECKPOINT_NOW = "checkpoint_now"


@dataclass(frozen=True)
class Progress:
    """Passed to on_progress after every iteration. Losses are weighted and summed over the batch."""

    scale: int  # 0-based scale index
    scales: int
    size: tuple[int, int]  # (h, w) of this scale
    iteration: int  # 1-based within the scale
    iterations: int  # in this scale
    step: int  # global, 1-based
    total_steps: int
    loss: float
    content_loss: float
    style_loss: float
    tv_loss: float
    elapsed: float  # seconds since the run started
    lr: float
    recoveries: int  # NaN/Inf recoveries so far


@dataclass
class PreparedItem:
    """One batch item as tensors: (1, 3, H, W) fp32 [0, 1] originals, blend and loss weights."""

    content: torch.Tensor  # what the content loss sees (its luminance when preserve_color)
    original: torch.Tensor  # the content as given, for colour recombination
    styles: list[torch.Tensor]
    blend: list[float]
    weights: tuple[float, float, float]  # content, style, tv


class Job:
    def __init__(
        self,
        model: VGGFeatures,
        items: list[PreparedItem],
        config: TransferConfig,
        schedule: Schedule,
        *,
        device: torch.device,
        cast: Callable[[], Any],
        channels_last: bool,
        digest: str,
        on_progress: Callable[[Progress], Any] | None,
        on_checkpoint: Callable[[Checkpoint], Any] | None,
    ) -> None:
        self.model, self.items, self.cfg, self.schedule = model, items, config, schedule
        self.device, self.cast, self.channels_last, self.digest = device, cast, channels_last, digest
        self.on_progress, self.on_checkpoint = on_progress, on_checkpoint
        self.content_layers = [layer_index(n) for n in config.content_layers]
        self.style_weights = {
            layer_index(n): w for n, w in zip(config.style_layers, config.layer_weights(), strict=True)
        }
        self.total = sum(n for _, n in schedule)
        self.step, self.lr, self.recoveries = 0, config.resolved_lr(), 0
        self.streak = 0  # consecutive non-finite steps, across scales (optim.Stepper)
        self.t0 = time.perf_counter()

    def run(self, resume: Checkpoint | None = None) -> torch.Tensor:
        """The whole pyramid; returns (B, 3, H, W) in [0, 1] at the last scale."""
        x: torch.Tensor | None = None
        opt_state: dict[str, Any] | None = None
        first, done = 0, 0
        if resume is not None:
            if resume.config_digest != self.digest:
                raise EngineError(
                    "the checkpoint was made with a different configuration or different images; "
                    "resume with the same settings and inputs, or start afresh",
                    code="checkpoint_mismatch",
                )
            x, opt_state = resume.image.to(self.device), resume.optimizer_state
            self.step, self.lr, self.recoveries = resume.step, resume.lr, resume.recoveries
            first, done = (resume.scale + 1, 0) if resume.end_of_scale else (resume.scale, resume.iteration)
        start = self.step
        for s in range(first, len(self.schedule)):
            hw = self.schedule[s][0]
            if done:  # resuming mid-scale: image and optimiser state as they were
                x0, state = x, opt_state
            elif x is None:
                x0, state = self._init_image(hw), None
            else:  # start from the previous scale's result, upsampled bicubically and clamped
                x0, state = resize(x, hw), self._carry(opt_state, hw)
            assert x0 is not None
            x, opt_state = self._run_scale(s, x0, state, done)
            done = 0
        if self.streak and self.streak == self.step - start:  # not one finite step: x is the start
            raise diverged(self.streak, self.lr)
        assert x is not None
        return x

    def _carry(self, state: dict[str, Any] | None, hw: tuple[int, int]) -> dict[str, Any] | None:
        if state is None or self.cfg.optimizer != "adam" or not self.cfg.carry_optimizer_state:
            return None  # L-BFGS history is reset at every scale
        return resize_adam_state(state, hw)

    def _init_image(self, hw: tuple[int, int]) -> torch.Tensor:
        b = len(self.items)
        if self.cfg.init == "noise":
            g = torch.Generator().manual_seed(self.cfg.seed)
            return torch.rand((b, 3, *hw), generator=g).to(self.device)
        if self.cfg.init == "gray":
            return torch.full((b, 3, *hw), 0.5, device=self.device)
        return torch.cat([resize(it.content, hw) for it in self.items]).to(self.device)

    def targets(self, hw: tuple[int, int]) -> Targets:
        """Content features and style Grams at this scale: contents resized from the originals,
        each style resized so its long edge is style_scale x the content's long edge."""
        contents = torch.cat([resize(it.content, hw) for it in self.items]).to(self.device)
        scale = self.cfg.style_scale  # the sizes were checked up front (schedule.check_runnable)
        styles = [
            [
                (resize(st, style_size((st.shape[-2], st.shape[-1]), hw, scale)).to(self.device), blend)
                for st, blend in zip(it.styles, it.blend, strict=True)
            ]
            for it in self.items
        ]
        weights = torch.tensor([it.weights for it in self.items], device=self.device)
        style_layers = list(self.style_weights)
        return compute_targets(
            self.model, contents, styles, self.content_layers, style_layers, weights, self.cast
        )

    def _run_scale(
        self, s: int, x0: torch.Tensor, state: dict[str, Any] | None, done: int
    ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        hw, iters = self.schedule[s]
        loss_fn = LossFn(self.model, self.targets(hw), self.style_weights, self.cast, self.channels_last)
        fn: Callable[[torch.Tensor], torch.Tensor] = loss_fn
        if not _CACHE_STYLE_TARGETS:
            def fn(x: torch.Tensor) -> torch.Tensor:
                loss_fn.targets = self.targets(hw)
                return loss_fn(x)
        cfg = self.cfg
        stepper = Stepper(
            x0, fn, cfg.optimizer, self.lr, betas=cfg.betas, history=cfg.lbfgs_history, state=state,
            max_recoveries=cfg.max_recoveries, streak=self.streak,
        )
        for it in range(done + 1, iters + 1):
            before = stepper.recoveries
            vals = stepper.step()
            self.step += 1
            self.lr, self.recoveries = stepper.lr, self.recoveries + stepper.recoveries - before
            self.streak = stepper.streak
            asked = self._report(s, hw, it, iters, vals) == CHECKPOINT_NOW
            end = it == iters
            due = end or asked or (cfg.save_every and it % cfg.save_every == 0)
            if self.on_checkpoint is not None and due:
                self.on_checkpoint(self._checkpoint(s, it, stepper, end))
        return stepper.x.detach(), stepper.opt.state_dict() if cfg.optimizer == "adam" else None

    def _report(self, s: int, hw: tuple[int, int], it: int, iters: int, vals: list[float]) -> Any:
        if self.on_progress is None:
            return None
        return self.on_progress(Progress(
            scale=s, scales=len(self.schedule), size=hw, iteration=it, iterations=iters,
            step=self.step, total_steps=self.total, loss=vals[0], content_loss=vals[1],
            style_loss=vals[2], tv_loss=vals[3], elapsed=time.perf_counter() - self.t0,
            lr=self.lr, recoveries=self.recoveries,
        ))

    def _checkpoint(self, s: int, it: int, stepper: Stepper, end: bool) -> Checkpoint:
        return Checkpoint(
            scale=s, iteration=it, step=self.step, image=stepper.x.detach().float().cpu().clone(),
            optimizer_state=stepper.state(), config_digest=self.digest, end_of_scale=end,
            lr=self.lr, recoveries=self.recoveries,
        )

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """preserve_color: the result's luminance with each content's chroma at the output size."""
        if not self.cfg.preserve_color:
            return x
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        originals = torch.cat([resize(it.original, hw) for it in self.items]).to(x.device)
        return color.recombine(x, originals)


def prepare_item(
    content: torch.Tensor, styles: list[torch.Tensor], blend: list[float],
    weights: tuple[float, float, float], preserve_color: bool,
) -> PreparedItem:
    if preserve_color:  # Gatys et al. 2016: transfer on luminance only, styles luminance-matched
        styles = [color.match_luminance(s, content) for s in styles]
        return PreparedItem(color.luminance(content), content, styles, blend, weights)
    return PreparedItem(content, content, styles, blend, weights)
