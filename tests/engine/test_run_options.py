"""`stylequeue run`'s engine options are generated from TransferConfig (worker/run_options.py)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from worker import run_cli, run_options
from worker.engine import TransferConfig

# The one option whose default is not None, and why: see run_options.option_default.
NOT_NONE = {"weights": "imagenet"}


@pytest.fixture(scope="module")
def run() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylequeue")
    sub = parser.add_subparsers(dest="command")
    run_cli.register(sub, ["run"])
    assert set(sub.choices) == {"run"}
    return sub.choices["run"]


def _actions(run: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in run._actions if a.option_strings}


def test_every_config_field_but_the_excluded_has_an_option(run: argparse.ArgumentParser) -> None:
    names = {f.name for f in dataclasses.fields(TransferConfig)}
    assert set(run_options.EXCLUDED) <= names, "EXCLUDED names a field TransferConfig no longer has"
    assert all(run_options.EXCLUDED.values()), "every exclusion says why"
    actions = _actions(run)
    for name in names - set(run_options.EXCLUDED):
        assert name in actions, f"TransferConfig.{name} has no `stylequeue run` option"
        assert run_options.HELP.get(name), f"TransferConfig.{name} has no help text in run_options.HELP"
    for name in run_options.EXCLUDED:
        assert name not in actions
    assert set(run_options.HELP) <= names and set(run_options.UNSET) <= names, "help for no field"


def test_option_defaults_are_none_and_the_help_shows_the_dataclass_default(
    run: argparse.ArgumentParser,
) -> None:
    actions, hints = _actions(run), typing.get_type_hints(TransferConfig)
    for f in dataclasses.fields(TransferConfig):
        if f.name in run_options.EXCLUDED:
            continue
        action = actions[f.name]
        assert action.default == NOT_NONE.get(f.name), f"--{f.name} must default to None"
        if hints[f.name] is bool:  # a flag that turns the default over
            assert isinstance(
                action, argparse._StoreTrueAction if f.default is False else argparse._StoreFalseAction
            )
            assert action.option_strings[0].startswith("--no-") is f.default
            continue
        assert action.help
        shown = NOT_NONE.get(f.name, f.default)
        if shown is not None:
            assert f"(default: {run_options.shown(shown)})" in action.help, action.help
        else:  # what None means to the engine, never "None"
            assert "(default: " in action.help and "(default: None)" not in action.help, action.help
    helps = {name: action.help or "" for name, action in actions.items()}
    assert "(default: 512)" in helps["size"] and "(default: 1.414)" in helps["scale_factor"]
    assert "(default: 1 for lbfgs, 0.02 for adam)" in helps["lr"]
    run.format_help()  # no stray % in any help text


def test_no_option_given_leaves_every_engine_default(run: argparse.ArgumentParser) -> None:
    args = run.parse_args(["c.png", "s.png", "-o", "o.png"])
    assert run_options.config_kwargs(args) == NOT_NONE
    args = run.parse_args(
        [
            "c.png",
            "s.png",
            "-o",
            "o.png",
            "--channels-last",
            "off",
            "--style-weights",
            "2,1",
            "--no-carry-optimizer-state",
            "--iterations",
            "7",
        ]
    )
    config = TransferConfig(**run_options.config_kwargs(args))
    assert config.channels_last is False and config.style_blend_weights == (2.0, 1.0)
    assert config.carry_optimizer_state is False and config.iterations == 7
