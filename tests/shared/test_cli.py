"""The ``stylequeue`` dispatcher (shared/cli.py): one map of commands, only the chosen parser built."""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.cli import COMMANDS, build_parser, command_of, main

REPO = Path(__file__).resolve().parents[2]


def test_each_module_defines_exactly_the_commands_the_map_gives_it() -> None:
    for module_name in set(COMMANDS.values()):
        module = importlib.import_module(module_name)
        assert set(module.SUMMARY) == {n for n, m in COMMANDS.items() if m == module_name}
    for name, module_name in COMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers(dest="command")
        importlib.import_module(module_name).register(sub, [name])
        assert set(sub.choices) == {name}


def test_the_chosen_command_gets_its_full_parser_and_the_rest_their_summary() -> None:
    parser = build_parser("status")
    args = parser.parse_args(["status", "abc", "--url", "http://x"])
    assert args.id == "abc" and args.url == "http://x" and callable(args.func)
    help_text = parser.format_help()
    # a long name's summary goes on the next line
    assert [n for n in COMMANDS if re.search(rf"^    {re.escape(n)}(?: |$)", help_text, re.M)] == list(
        COMMANDS
    )
    with pytest.raises(SystemExit) as e:  # an unknown command: argparse's usage error
        main(["nope"])
    assert e.value.code == 2


@pytest.mark.parametrize(
    "argv, command",
    [
        ([], None),
        (["run", "c.png"], "run"),
        (["-v", "keys", "create"], "keys"),
        (["--help"], None),
    ],
)
def test_command_of(argv: list[str], command: str | None) -> None:
    assert command_of(argv) == command


def test_help_and_the_client_and_server_commands_import_no_torch() -> None:
    code = (
        "import sys\n"
        "from shared.cli import main\n"
        "for argv in (['--help'], ['submit', '--help'], ['api', '--help'], ['worker', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'httpx', 'uvicorn', 'celery')]\n"
        "print(bad, file=sys.stderr)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(name in out.stdout for name in COMMANDS)
