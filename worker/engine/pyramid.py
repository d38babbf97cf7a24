"""One job's coarse-to-fine pyramid (Pyramid): scales, targets cached per scale, progress and checkpoints."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from . import color
from .checkpoint import Checkpoint
from .config import TransferConfig
from .errors import EngineError
from .images import resize
from .items import PreparedItem, removed_fractions
from .objective import LossFn
from .optim import Stepper, diverged, resize_adam_state
from .progress import CHECKPOINT_NOW, Progress
from .scaler import LossScaler
from .schedule import Schedule, style_size
from .targets import StyleSpec, Targets, compute_targets
from .vgg import VGGFeatures, layer_index

logger = logging.getLogger(__name__)

# Private switch for bench/engine.py: False recomputes the style targets at every iteration, as naive
# implementations do, to measure what caching them once per scale saves.
_CACHE_STYLE_TARGETS = True


class Pyramid:
    """Runs one batch of images through the scale pyramid (named so as not to clash with the
    service's ``shared.models.Job`` row)."""

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
        loss_scaling: bool = False,
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
        self.scaler = LossScaler() if loss_scaling else None  # fp16 (scaler.py), across scales
        # per item (content, style, tv) weighted at this scale's first evaluation (LossFn.start)
        self.start: list[list[float]] | None = None
        # per scale: the fraction of each term removed by its last iteration (None: not run here)
        self.removed: list[dict[str, float | None] | None] = [None] * len(schedule)
        # color="luminance": the optimised image is the luminance Y alone, (B, 1, H, W)
        self.channels = 1 if config.color == "luminance" else 3
        self.average: dict[str, Any] | None = None  # a mid-scale resume's EMA state (Stepper)

    def run(self, resume: Checkpoint | None = None) -> torch.Tensor:
        """The whole pyramid; returns (B, C, H, W) in [0, 1] at the last scale, C = self.channels
        (finish() makes the delivered RGB image of it)."""
        x: torch.Tensor | None = None
        opt_state: dict[str, Any] | None = None
        first, done, divisor = 0, 0, None
        if resume is not None:
            if resume.config_digest != self.digest:
                raise EngineError(
                    "checkpoint_mismatch",
                    "the checkpoint was made with a different configuration or different images; "
                    "resume with the same settings and inputs, or start afresh",
                )
            image = resume.image if self.channels == 3 else resume.luminance
            if image is None or image.shape[1] != self.channels:
                raise EngineError(
                    "checkpoint_mismatch", "the checkpoint holds no luminance image to resume from"
                )
            if not resume.end_of_scale and resume.iterate is not None:
                image = resume.iterate  # mid-scale with an EMA: the optimiser's own x
            x, opt_state = image.to(self.device), resume.optimizer_state
            self.step, self.lr, self.recoveries = resume.step, resume.lr, resume.recoveries
            if self.scaler is not None:
                self.scaler = LossScaler.from_state(resume.loss_scaler)
            first, done = (resume.scale + 1, 0) if resume.end_of_scale else (resume.scale, resume.iteration)
            divisor = None if resume.end_of_scale else resume.loss_start
            self.average = None if resume.end_of_scale else resume.average
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
            x, opt_state = self._run_scale(s, x0, state, done, divisor)
            done, divisor = 0, None
        if self.streak and self.streak == self.step - start:  # not one finite step: x is the start
            raise diverged(self.streak, self.lr)
        assert x is not None
        return x

    def _carry(self, state: dict[str, Any] | None, hw: tuple[int, int]) -> dict[str, Any] | None:
        if state is None or self.cfg.optimizer != "adam" or not self.cfg.carry_optimizer_state:
            return None  # L-BFGS history is reset at every scale
        return resize_adam_state(state, hw)

    def _init_image(self, hw: tuple[int, int]) -> torch.Tensor:
        b, c = len(self.items), self.channels
        if self.cfg.init == "noise":
            g = torch.Generator().manual_seed(self.cfg.seed)
            return torch.rand((b, c, *hw), generator=g).to(self.device)
        if self.cfg.init == "gray":
            return torch.full((b, c, *hw), 0.5, device=self.device)
        # luminance: the content is grey already (prepare_item), so any channel is its Y
        return torch.cat([resize(it.content, hw)[:, :c] for it in self.items]).to(self.device)

    def targets(self, hw: tuple[int, int]) -> Targets:
        """Content features and style Grams at this scale: contents resized from the originals,
        each style resized so its long edge is style_scale x the content's long edge (at most its
        native one unless style_upscale), from its native (h, w)."""
        contents = torch.cat([resize(it.content, hw) for it in self.items]).to(self.device)
        scale, up = self.cfg.style_scale, self.cfg.style_upscale  # checked up front (check_runnable)
        styles = [
            [
                (resize(st, style_size(native, hw, scale, upscale=up)).to(self.device), blend)
                for st, native, blend in zip(
                    it.styles, it.style_hws or [_hw(s) for s in it.styles], it.blend, strict=True
                )
            ]
            for it in self.items
        ]
        weights = torch.tensor([it.weights for it in self.items], device=self.device)
        style_layers = list(self.style_weights)
        spec = StyleSpec(self.cfg.style_loss, self.cfg.loss_terms == "relative")
        masks = [it.masks_at(hw) for it in self.items]
        return compute_targets(
            self.model,
            contents,
            styles,
            self.content_layers,
            style_layers,
            weights,
            self.cast,
            masks=[None if m is None else [t.to(self.device) for t in m] for m in masks]
            if any(m is not None for m in masks)
            else None,
            spec=spec,
            style_keys=[it.style_keys for it in self.items],
        )

    def _run_scale(
        self,
        s: int,
        x0: torch.Tensor,
        state: dict[str, Any] | None,
        done: int,
        start: list[list[float]] | None,
    ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        hw, iters = self.schedule[s]
        self.start = start  # resuming mid-scale: the objective's divisor as it was
        loss_fn = LossFn(
            self.model,
            self.targets(hw),
            self.style_weights,
            self.cast,
            self.channels_last,
            start=None if start is None else torch.tensor(start, device=self.device),
        )
        fn: Callable[[torch.Tensor], torch.Tensor] = loss_fn
        if not _CACHE_STYLE_TARGETS:

            def fn(x: torch.Tensor) -> torch.Tensor:
                loss_fn.targets = self.targets(hw)
                return loss_fn(x)

        cfg = self.cfg
        stepper = Stepper(
            x0,
            fn,
            cfg.optimizer,
            self.lr,
            betas=cfg.betas,
            history=cfg.lbfgs_history,
            state=state,
            max_recoveries=cfg.max_recoveries,
            streak=self.streak,
            max_step=cfg.lbfgs_max_step,
            scaler=self.scaler,
            ema_decay=cfg.ema_decay,
            average=self.average if done else None,
        )
        self.average = None
        for it in range(done + 1, iters + 1):
            before = stepper.recoveries
            vals = stepper.step()
            self._note_start(loss_fn, stepper.bad)
            self.step += 1
            self.lr, self.recoveries = stepper.lr, self.recoveries + stepper.recoveries - before
            self.streak = stepper.streak
            asked = self._report(s, hw, it, iters, vals) == CHECKPOINT_NOW
            end = it == iters
            due = end or asked or (cfg.save_every and it % cfg.save_every == 0)
            if self.on_checkpoint is not None and due:
                self.on_checkpoint(self._checkpoint(s, it, stepper, end))
        # Adam with an EMA: the next scale starts from this one's average, as crowsonkb's does
        return stepper.result(), stepper.opt.state_dict() if cfg.optimizer == "adam" else None

    def _note_start(self, loss_fn: LossFn, bad: bool) -> None:
        """Keep a host copy of the objective's divisor once the scale has had a finite evaluation;
        if its first evaluation was not finite, the divisor is taken again at the next one."""
        if self.start is not None:
            return
        if bad or loss_fn.start is None:
            loss_fn.start = None
        else:
            self.start = loss_fn.start.tolist()  # one host read per scale

    def _report(self, s: int, hw: tuple[int, int], it: int, iters: int, vals: list[float]) -> Any:
        removed = removed_fractions(self.start, vals[1:5])  # vals: objective, total, c, s, tv
        if it == iters:
            self.removed[s] = removed
        if self.on_progress is None:
            return None
        return self.on_progress(
            self.progress(s, it, vals[1:5], self.start, lr=self.lr, recoveries=self.recoveries)
        )

    def progress(
        self,
        s: int,
        it: int,
        vals: list[float],
        start: list[list[float]] | None,
        *,
        lr: float,
        recoveries: int,
        step: int | None = None,
    ) -> Progress:
        """The Progress of iteration ``it`` of scale ``s``; ``vals``: total, content, style, tv;
        ``step``: the job's step count (None: this run's, ``self.step``)."""
        removed = removed_fractions(start, vals)
        hw, iters = self.schedule[s]
        return Progress(
            scale=s,
            scales=len(self.schedule),
            size=hw,
            iteration=it,
            iterations=iters,
            step=self.step if step is None else step,
            total_steps=self.total,
            loss=vals[0],
            content_loss=vals[1],
            style_loss=vals[2],
            tv_loss=vals[3],
            elapsed=time.perf_counter() - self.t0,
            lr=lr,
            recoveries=recoveries,
            loss_removed=removed["loss"],
            content_removed=removed["content"],
            style_removed=removed["style"],
            tv_removed=removed["tv"],
        )

    def _checkpoint(self, s: int, it: int, stepper: Stepper, end: bool) -> Checkpoint:
        x = stepper.result()  # what the scale would deliver now (the average, with an EMA)
        luminance = x.float().cpu().clone() if self.channels == 1 else None
        avg = stepper.average
        return Checkpoint(
            scale=s,
            iteration=it,
            step=self.step,
            image=self.finish(x).float().cpu().clone(),
            luminance=luminance,
            optimizer_state=stepper.state(),
            config_digest=self.digest,
            end_of_scale=end,
            lr=self.lr,
            recoveries=self.recoveries,
            loss_start=self.start,
            loss_scaler=self.scaler.state() if self.scaler is not None else None,
            iterate=stepper.x.detach().float().cpu().clone() if avg is not None else None,
            average=avg.state() if avg is not None else None,
        )

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The delivered (B, 3, H, W) RGB image of an iterate: x itself, or for color="luminance"
        the optimised Y with each content's chroma (I, Q) at x's size. Checkpoint previews show
        this too, so they look like the result."""
        if self.channels == 3:
            return x
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        originals = torch.cat([resize(it.original, hw) for it in self.items]).to(x.device)
        return color.recombine(x, originals)


def _hw(t: torch.Tensor) -> tuple[int, int]:
    return int(t.shape[-2]), int(t.shape[-1])
