"""`stylequeue run`'s engine options, generated from ``TransferConfig``'s fields.

Every field but those in ``EXCLUDED`` becomes one option, named after the field (``RENAMED`` keeps
the older spellings) and defaulting to None, so an option left out leaves the engine's default in
force. The defaults shown in the help are read from the dataclass, types from the field types and
choices from the config's ``_CHOICES``; only the help sentences are written here, in ``HELP`` and, for
a field whose default is None, ``UNSET`` (what None means to the engine).

Importing this module imports no torch. ``engine_options()`` and ``config_kwargs()`` import
``worker.engine``, and with it torch: the package's ``__init__`` loads the whole engine, even for
``worker.engine.config`` alone. So ``run_cli`` builds `run`'s parser only when `run` is the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

# Fields with no option, and why.
EXCLUDED = {
    "betas": "Adam's betas stay crowsonkb's (0.9, 0.99); the API does not offer them either",
    "pad_replicate": "conv1_1's replicate padding is part of the model; tests switch it, users don't",
}
# Options spelt otherwise than their field.
RENAMED = {"style_blend_weights": "--style-weights"}

HELP = {
    "size": "output long edge in px",
    "min_size": "first scale's long edge",
    "scale_factor": "growth per scale, {min_scale_factor:g} to {max_scale_factor:g}",
    "scales": "explicit long edges, e.g. 128,256,512",
    "iterations": "per scale: one int, or a comma list",
    "content_layers": "layers whose features are matched to the content's, comma-separated",
    "style_layers": "layers whose statistics are matched to the styles', comma-separated",
    "style_layer_weights": "one per style layer",
    "loss_terms": "relative: each term divided by its target's energy; raw: the papers' terms",
    "style_loss": "gram: Gram-matrix MSE; w2: Wasserstein-2 between feature Gaussians",
    "content_weight": "content term's weight; only the ratios of the three weights count, 0 is off",
    "style_weight": "style term's weight",
    "tv_weight": "total-variation (smoothness) term's weight",
    "style_blend_weights": "blend weights, one per style",
    "style_scale": "style size relative to the content",
    "style_upscale": "let a style grow past its native size to style-scale x the content "
    "(otherwise it is capped at its native size)",
    "color": "luminance: transfer on luminance, keep the content's colours; histogram: give the "
    "styles the content's colour statistics first",
    "preserve_color": "keep the content's colours (the same as --color luminance)",
    "init": "the starting image",
    "optimizer": "lbfgs (Gatys) or adam",
    "lr": "step size",
    "ema_decay": "adam: deliver the average of the iterates with this decay, 0 for the last one",
    "lbfgs_history": "L-BFGS history length (about two image copies each)",
    "lbfgs_max_step": "largest pixel change (0-1 range) in one L-BFGS step; longer steps shrink",
    "carry_optimizer_state": "adam: start every scale afresh instead of carrying the moments over",
    "seed": "seed of the noise init and of random weights",
    "precision": "auto: bf16 autocast on CUDA when supported, else fp32; fp16: CUDA only",
    "pooling": "VGG's max pooling, or avg scaled to max's magnitudes",
    "device": "auto, cpu or cuda:N",
    "weights": "imagenet, PATH, caffe:PATH or random (tests only)",
    "channels_last": "channels-last memory format",
    "save_every": "also checkpoint every N iterations, 0 for scale ends only",
    "max_scales": "refuse a schedule of more scales than this",
    "max_recoveries": "NaN/Inf recoveries in a row before the run fails as diverged",
}
# What None means, for the fields whose default is None (lr and the loss weights are computed).
UNSET = {
    "scales": "from --size, --min-size and --scale-factor",
    "iterations": "auto",
    "style_layer_weights": "each {layer_decay:g}x the next deeper one's, summing to 1; raw terms: 1 each",
    "style_blend_weights": "equal",
    "device": "auto",
    "channels_last": "auto",
}
_TRISTATE = {"auto": None, "on": True, "off": False}  # a `bool | None` field's option


_T = TypeVar("_T")


def _list(kind: Callable[[str], _T], name: str) -> Callable[[str], tuple[_T, ...]]:
    def parse(text: str) -> tuple[_T, ...]:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {name}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
        return values

    return parse


def _iterations(text: str) -> int | tuple[int, ...]:
    values = _list(int, "integers")(text)
    return values[0] if len(values) == 1 and "," not in text else values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


# A field's type, None left out -> how its option's value is parsed.
_PARSERS: dict[tuple[Any, ...], Any] = {
    (int,): int,
    (float,): float,
    (str,): str,
    (tuple[int, ...],): _list(int, "integers"),
    (tuple[float, ...],): _list(float, "numbers"),
    (tuple[str, ...],): _names,
    (int, tuple[int, ...]): _iterations,
}


def _members(hint: Any) -> tuple[tuple[Any, ...], bool]:
    """(the types a field may hold other than None, whether it may be None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (hint,), False


def shown(value: Any) -> str:
    """A default as the help shows it: lists comma-separated as typed, numbers in short."""
    if isinstance(value, tuple):
        return ",".join(shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclasses.dataclass(frozen=True)
class EngineField:
    """One TransferConfig field that has an option: its default, and the types it holds but None."""

    name: str
    default: Any
    members: tuple[Any, ...]
    optional: bool

    @property
    def is_flag(self) -> bool:
        return self.members == (bool,) and not self.optional

    @property
    def flag(self) -> str:
        dashed = "--" + self.name.replace("_", "-")
        if self.is_flag and self.default is True:
            dashed = "--no-" + dashed[2:]  # a flag turns the dataclass's default over
        return RENAMED.get(self.name, dashed)


def engine_fields() -> list[EngineField]:
    from worker.engine import TransferConfig

    hints = typing.get_type_hints(TransferConfig)
    return [
        EngineField(f.name, f.default, *_members(hints[f.name]))
        for f in dataclasses.fields(TransferConfig)
        if f.name not in EXCLUDED
    ]


def option_default(name: str) -> Any:
    """None for every option but --weights, which has always put its value into the config too (so
    into checkpoint digests): it defaults to StyleTransfer's own default, or older checkpoints would
    no longer resume."""
    if name != "weights":
        return None
    from worker.engine import StyleTransfer

    return inspect.signature(StyleTransfer).parameters["weights"].default


def engine_options() -> list[tuple[str, dict[str, Any]]]:
    """(flag, add_argument keywords) for every engine option, in the dataclass's order."""
    from worker.engine.config import _CHOICES

    options = []
    for f in engine_fields():
        text = _fill(HELP.get(f.name, ""))
        kwargs: dict[str, Any] = {"dest": f.name, "default": option_default(f.name)}
        if f.is_flag:
            kwargs["action"] = "store_true" if f.default is False else "store_false"
        else:
            text += f" (default: {default_text(f)})"
            if f.members == (bool,):
                kwargs["choices"] = tuple(_TRISTATE)
            elif f.name in _CHOICES:
                kwargs["choices"] = _CHOICES[f.name]
            else:
                kwargs["type"] = _parser(f)
                kwargs["metavar"] = f.flag[2:].upper().replace("-", "_")
        kwargs["help"] = text.replace("%", "%%")
        options.append((f.flag, kwargs))
    return options


def _parser(f: EngineField) -> Any:
    if f.members not in _PARSERS:
        raise TypeError(
            f"TransferConfig.{f.name}: no option type for {f.members}; add one to "
            "run_options._PARSERS, or the field to EXCLUDED"
        )
    return _PARSERS[f.members]


def default_text(f: EngineField) -> str:
    """The default as the help states it: the dataclass's, or what its None means to the engine."""
    from worker.engine import TransferConfig
    from worker.engine.config import _CHOICES

    given = option_default(f.name)
    default = f.default if given is None else given
    if default is not None:
        return shown(default)
    base = TransferConfig()
    if f.name in ("content_weight", "style_weight", "tv_weight"):
        # relative terms have one preset for every weights family, so any family name reads it
        value = getattr(base.loss_weights("torchvision"), f.name.removesuffix("_weight"))
        return f"the preset: {shown(value)} with {base.loss_terms} terms"
    if f.name == "lr":
        return ", ".join(
            f"{shown(dataclasses.replace(base, optimizer=o).resolved_lr())} for {o}"
            for o in _CHOICES["optimizer"]
        )
    return _fill(UNSET[f.name])


def _fill(text: str) -> str:
    """Help text with the engine's constants filled in ({min_scale_factor} and so on)."""
    from worker.engine.config import LAYER_DECAY
    from worker.engine.schedule import MAX_SCALE_FACTOR, MIN_SCALE_FACTOR

    return text.format(
        min_scale_factor=MIN_SCALE_FACTOR, max_scale_factor=MAX_SCALE_FACTOR, layer_decay=LAYER_DECAY
    )


def add_engine_options(parser: argparse.ArgumentParser, options: list[tuple[str, dict[str, Any]]]) -> None:
    group = parser.add_argument_group(
        "engine options",
        "the fields of the engine's TransferConfig; an option left out keeps the engine's default",
    )
    for flag, kwargs in options:
        group.add_argument(flag, **kwargs)


def config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """TransferConfig keywords for the engine options that were given."""
    kwargs = {}
    for f in engine_fields():
        value = getattr(args, f.name, None)
        if f.members == (bool,) and f.optional and value is not None:
            value = _TRISTATE[value]
        if value is not None:
            kwargs[f.name] = value
    return kwargs
